// Shared by every page: the gateway's ports, fetch with readable errors and keys, server-sent events, DOM building.

let configPromise = null;

/** The gateway's ports by name ({inference, management, openai, ...}), from /ui/config.json. */
export function config() {
  configPromise ??= request('/ui/config.json').then((response) => response.json());
  return configPromise;
}

// ---- keys ----------------------------------------------------------------------------------------------------
// A port with keys answers 401 without one. The page then asks for the key (the management port's, or the one of
// the inference ports) and keeps it in sessionStorage: this tab only, gone when it closes; never a cookie, never
// localStorage, never sent anywhere but to the gateway's own ports.

const KEY_PREFIX = 'liftoff-key:';
const KEY_NAMES = { inference: 'api_keys', management: 'management_api_keys' };
const asking = {}; // kind → the pending question, so that requests refused together ask once

/** Which key a URL needs: "management", "inference", or null (the page's own files, the internal port). */
async function keyKind(url) {
  const target = new URL(url, location.href);
  if (target.origin === location.origin && target.pathname.startsWith('/ui/')) return null;
  const { ports } = await config();
  const port = Number(target.port || (target.protocol === 'https:' ? 443 : 80));
  if (port === ports.management) return 'management';
  return port === ports.internal ? null : 'inference';
}

/** The key this tab keeps for `kind`, or null. */
export function storedKey(kind) {
  return sessionStorage.getItem(KEY_PREFIX + kind);
}

/** Forget every key this tab keeps. */
export function forgetKeys() {
  for (const kind of Object.keys(KEY_NAMES)) sessionStorage.removeItem(KEY_PREFIX + kind);
}

/** Ask for the key of `kind` in a dialog; answers it (kept for the tab) or null when the person cancels. */
function askKey(kind, refused) {
  asking[kind] ??= keyDialog(kind, refused).finally(() => delete asking[kind]);
  return asking[kind];
}

function keyDialog(kind, refused) {
  return new Promise((resolve) => {
    const input = h('input', { type: 'password', id: 'key-input', autocomplete: 'off', required: true,
                              'aria-label': `${kind} key` });
    const cancel = h('button', { type: 'button', id: 'key-cancel' }, 'Cancel');
    const form = h('form', { method: 'dialog' },
      h('h2', {}, `This server asks for its ${kind} key`),
      h('p', { class: 'muted small' }, `One of ${KEY_NAMES[kind]} in its configuration. It is kept in this tab only, `
        + 'until the tab closes.'),
      refused ? h('p', { class: 'notice error', id: 'key-refused' }, 'The server refused that key.') : null,
      input,
      h('div', { class: 'row end' }, cancel, h('button', { type: 'submit', id: 'key-submit', class: 'primary' },
        'Use key')));
    const dialog = h('dialog', { id: 'key-dialog', class: 'key-dialog', dataset: { kind } }, form);
    const finish = (key) => {
      dialog.close();
      dialog.remove();
      if (key) sessionStorage.setItem(KEY_PREFIX + kind, key);
      resolve(key);
    };
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      finish(input.value.trim() || null);
    });
    cancel.addEventListener('click', () => finish(null));
    dialog.addEventListener('cancel', () => finish(null));
    document.body.append(dialog);
    dialog.showModal();
    input.focus();
  });
}

/** The base URL of one of the gateway's ports, on the host this page came from. */
export async function portUrl(name) {
  const { ports } = await config();
  if (!(name in ports)) throw new Error(`the gateway has no ${name} port`);
  return `${location.protocol}//${location.hostname}:${ports[name]}`;
}

/** An HTTP error with the server's own message (`detail` natively, `error.message` on the OpenAI port). */
export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.body = body;
  }
}

/** The error an unsuccessful response stands for, with the server's message. */
export async function errorOf(response) {
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: show the text
  }
  let detail = body?.detail ?? body?.error?.message ?? (text || response.statusText);
  if (typeof detail !== 'string') detail = JSON.stringify(detail);
  const kind = body?.error_type ?? body?.error?.code ?? '';
  return new ApiError(response.status, `${response.status}${kind ? ` ${kind}` : ''}: ${detail}`, body);
}

async function send(url, options, key) {
  const headers = new Headers(options.headers ?? {});
  if (key) headers.set('authorization', `Bearer ${key}`);
  try {
    return await fetch(url, { ...options, headers });
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    const where = new URL(url, location.href).host;
    throw new Error(`cannot reach ${where}: ${error.message}`);
  }
}

/**
 * fetch(), with the port's key when this tab has one (asked for on a 401); a failed answer throws an ApiError, and
 * an unreachable server an Error that names the address.
 */
export async function request(url, options = {}) {
  const kind = await keyKind(url);
  for (let asked = 0; ; asked += 1) {
    const key = kind && storedKey(kind);
    const response = await send(url, options, key);
    if (response.status === 401 && kind && asked < 3 && (await askKey(kind, Boolean(key)))) continue;
    if (!response.ok) throw await errorOf(response);
    return response;
  }
}

/** POST a JSON body; the response (throws ApiError unless it succeeds). */
export function postJSON(url, body, options = {}) {
  return request(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
    ...options,
  });
}

/**
 * The server-sent events of a response, as {event, data}: `event` is "message" unless named, `data` the lines of
 * the event's `data:` fields joined by "\n" (one space after the colon is dropped, as the SSE standard says).
 */
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let data = [];
  let event = 'message';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, '');
        buffer = buffer.slice(end + 1);
        if (line === '') {
          if (data.length) yield { event, data: data.join('\n') };
          data = [];
          event = 'message';
          continue;
        }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? '' : line.slice(colon + 1);
        if (text.startsWith(' ')) text = text.slice(1);
        if (field === 'data') data.push(text);
        else if (field === 'event') event = text;
      }
    }
    if (data.length) yield { event, data: data.join('\n') };
  } finally {
    reader.releaseLock();
  }
}

/** Build an element: h('a', {href: '/', class: 'x', onclick: f}, 'text', child, ...). Text is never parsed as HTML. */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') element.className = value;
    else if (key === 'dataset') Object.assign(element.dataset, value);
    else if (key.startsWith('on')) element.addEventListener(key.slice(2), value);
    else element.setAttribute(key, value === true ? '' : value);
  }
  element.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return element;
}

export const $ = (selector, root = document) => root.querySelector(selector);

/** Show `error` (or a message) in a notice element; `null` hides it. */
export function notify(element, message, kind = 'error') {
  if (message === null || message === undefined) {
    element.className = 'notice hidden';
    element.textContent = '';
    return;
  }
  element.className = `notice ${kind}`;
  element.textContent = message instanceof Error ? message.message : String(message);
}

/** The consumer groups with a loading or live reader: {group: [{reader_id, model_name, ready, ...}]}. */
export async function readerGroups() {
  const response = await request(`${await portUrl('management')}/reader_groups`);
  return response.json();
}

/**
 * Fill a <select> with the consumer groups; keeps the current choice (or `preferred`) when it is still there.
 * Answers the groups; shows `emptyText` as the only (disabled) option when there are none.
 */
export async function fillGroups(select, { preferred = 'primary', emptyText = 'no readers yet' } = {}) {
  const groups = await readerGroups();
  const current = select.value || preferred;
  const names = Object.keys(groups).sort();
  select.replaceChildren(
    ...names.map((name) => {
      const readers = groups[name];
      const models = [...new Set(readers.map((reader) => reader.model_name))].join(', ');
      const live = readers.filter((reader) => reader.ready).length;
      const state = live ? `${live} live` : 'loading';
      return h('option', { value: name }, `${name} — ${models} (${state})`);
    }),
  );
  if (!names.length) select.append(h('option', { value: '', disabled: true }, emptyText));
  select.value = names.includes(current) ? current : (names[0] ?? '');
  return groups;
}

export function formatMs(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return '–';
  if (ms === 0) return '0';
  if (ms < 1) return `${Number(ms.toPrecision(2))} ms`;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return `${Number((ms / 1000).toFixed(ms < 10000 ? 2 : 1))} s`;
}

export function formatNumber(value, digits = 1) {
  if (value === null || value === undefined || !Number.isFinite(value)) return '–';
  if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString('en');
  return value.toFixed(Number.isInteger(value) ? 0 : digits);
}

/** Age of an epoch-milliseconds timestamp, e.g. "0.8 s", "3 min". */
export function formatAge(epochMs, now = Date.now()) {
  if (!epochMs) return '–';
  const seconds = Math.max(0, (now - epochMs) / 1000);
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

/** A stat tile's value element: <div class="stat"><div class="value">…</div><div class="name">…</div></div>. */
export function statTile(name, id) {
  return h('div', { class: 'stat' }, h('div', { class: 'value', id }, '–'), h('div', { class: 'name' }, name));
}
