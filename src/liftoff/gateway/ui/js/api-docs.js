// The API docs: each port's OpenAPI description, fetched from the port and rendered here (no Swagger UI, which
// needs the internet): every operation with its parameters, body fields and responses.
import { $, config, h, notify, portUrl, request } from './common.js';

const METHODS = ['get', 'post', 'put', 'patch', 'delete'];
let spec = null;

function resolve(schema) {
  let current = schema;
  for (let depth = 0; current?.$ref && depth < 10; depth += 1) {
    current = current.$ref.replace(/^#\//, '').split('/').reduce((node, key) => node?.[key], spec);
  }
  return current ?? {};
}

/** A short type description: "string", "integer | null", "array of Message", "GenerateRequest". */
export function typeOf(schema) {
  if (!schema) return 'any';
  if (schema.$ref) return schema.$ref.split('/').pop();
  const union = schema.anyOf ?? schema.oneOf;
  if (union) return union.map(typeOf).join(' | ');
  if (schema.enum) return schema.enum.map((value) => JSON.stringify(value)).join(' | ');
  if (schema.type === 'array') return `array of ${typeOf(schema.items)}`;
  if (schema.type === 'object' && schema.additionalProperties && typeof schema.additionalProperties === 'object') {
    return `map of ${typeOf(schema.additionalProperties)}`;
  }
  return schema.type ?? schema.title ?? 'any';
}

function fieldsTable(schema) {
  const resolved = resolve(schema);
  const properties = Object.entries(resolved.properties ?? {});
  if (!properties.length) return h('p', { class: 'muted small' }, typeOf(schema));
  const required = new Set(resolved.required ?? []);
  return h('div', { class: 'table-wrap' }, h('table', {},
    h('thead', {}, h('tr', {}, ['Field', 'Type', 'Default', 'Description'].map((name) => h('th', {}, name)))),
    h('tbody', {}, properties.map(([name, property]) => h('tr', {},
      h('td', {}, h('code', {}, name), required.has(name) ? h('span', { class: 'muted small' }, ' required') : null),
      h('td', { class: 'small' }, typeOf(property)),
      h('td', { class: 'small mono' }, 'default' in property ? JSON.stringify(property.default) : ''),
      h('td', { class: 'small' }, property.description ?? resolve(property).description ?? ''))))));
}

function operation(path, method, op) {
  const parameters = op.parameters ?? [];
  const body = op.requestBody?.content?.['application/json']?.schema;
  const responses = Object.entries(op.responses ?? {});
  return h('details', { class: 'op', dataset: { method, path } },
    h('summary', {}, h('span', { class: `method ${method}` }, method.toUpperCase()), h('span', { class: 'path' }, path),
      h('span', { class: 'summary' }, op.summary ?? '')),
    h('div', {},
      op.description ? h('p', { class: 'small pre' }, op.description) : null,
      parameters.length ? [h('h3', {}, 'Parameters'), h('div', { class: 'table-wrap' }, h('table', {},
        h('tbody', {}, parameters.map((p) => h('tr', {}, h('td', {}, h('code', {}, p.name)), h('td', { class: 'small' }, p.in),
          h('td', { class: 'small' }, typeOf(p.schema)), h('td', { class: 'small' }, p.description ?? '')))))) ] : null,
      body ? [h('h3', {}, `Body: ${typeOf(body)}`), fieldsTable(body)] : null,
      responses.length ? [h('h3', {}, 'Responses'), h('ul', { class: 'small' }, responses.map(([code, response]) => {
        const schema = response.content?.['application/json']?.schema;
        return h('li', {}, h('strong', {}, code), ` ${response.description ?? ''}`, schema ? ` (${typeOf(schema)})` : '');
      }))] : null));
}

async function showPort(name) {
  for (const tab of document.querySelectorAll('#tabs button')) tab.setAttribute('aria-selected', String(tab.dataset.port === name));
  const doc = $('#doc');
  doc.replaceChildren(h('p', { class: 'muted' }, 'Loading…'));
  notify($('#error'), null);
  const base = await portUrl(name);
  try {
    spec = await (await request(`${base}/openapi.json`)).json();
  } catch (error) {
    notify($('#error'), `The ${name} port's OpenAPI description could not be loaded: ${error.message}`);
    doc.replaceChildren();
    return;
  }
  const operations = [];
  for (const [path, item] of Object.entries(spec.paths ?? {}).sort(([a], [b]) => a.localeCompare(b))) {
    for (const method of METHODS) if (item[method]) operations.push(operation(path, method, item[method]));
  }
  doc.replaceChildren(
    h('div', { class: 'row' }, h('h2', { class: 'grow' }, `${spec.info?.title ?? name} ${spec.info?.version ?? ''}`),
      h('a', { href: `${base}/openapi.json` }, 'openapi.json'), h('a', { href: `${base}/docs` }, 'Swagger UI')),
    h('p', { class: 'muted small' }, `${base} · ${operations.length} operations`),
    ...operations);
}

async function start() {
  try {
    const { ports } = await config();
    const names = Object.keys(ports);
    $('#tabs').replaceChildren(...names.map((name) => h('button', {
      type: 'button', role: 'tab', dataset: { port: name }, onclick: () => { location.hash = name; },
    }, `${name} ${ports[name]}`)));
    const pick = () => showPort(names.includes(location.hash.slice(1)) ? location.hash.slice(1) : names[0]);
    window.addEventListener('hashchange', pick);
    await pick();
  } catch (error) {
    notify($('#error'), error);
  }
}

start();
