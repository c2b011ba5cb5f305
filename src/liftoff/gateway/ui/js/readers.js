// The readers page: GET /status on the management port every 1.5 s, a table per consumer group, a form that
// adds a reader (POST /reader) and a two-click remove button per reader (DELETE /reader/{id}).
import { $, formatAge, h, notify, portUrl, postJSON, request } from './common.js';

const management = () => portUrl('management');

const POLL_MS = 1500;
const STATES = ['live', 'loading', 'dead'];
const armed = new Map(); // reader id → timer of a pending "confirm remove"
const open = new Map(); // reader id → the detail shown under its row (GET /reader/{id}), or null while it loads
let latest = null; // the last /status body
let shown = ''; // what the tables show now (rebuilt only when it changes)

/** Consumer group → readers ({id, state, info, heartbeat}), groups by name, readers live first. */
export function byGroup(status) {
  const groups = new Map();
  for (const state of STATES) {
    for (const [id, info] of Object.entries(status[`${state}_readers`])) {
      const heartbeat = status.last_heartbeat?.[id] ?? null;
      for (const group of info.consumer_groups.length ? info.consumer_groups : ['(none)']) {
        if (!groups.has(group)) groups.set(group, []);
        groups.get(group).push({ id, state, info, heartbeat });
      }
    }
  }
  return new Map([...groups.entries()].sort(([a], [b]) => a.localeCompare(b)));
}

function ageCell(reader) {
  const cell = h('td', { class: 'num age', 'data-label': 'heartbeat' });
  if (reader.heartbeat && reader.state !== 'dead') {
    cell.dataset.ts = reader.heartbeat.heartbeat_timestamp;
    cell.dataset.interval = reader.heartbeat.heartbeat_wait_interval;
  }
  return cell;
}

function updateAges() {
  const now = Date.now();
  for (const cell of document.querySelectorAll('td.age[data-ts]')) {
    const ts = Number(cell.dataset.ts);
    cell.textContent = `${formatAge(ts, now)} ago`;
    cell.classList.toggle('stale', now - ts > 3 * Number(cell.dataset.interval || 1000));
  }
}

function removeButton(id) {
  const confirming = armed.has(id);
  return h('button', {
    type: 'button',
    class: `small danger${confirming ? ' armed' : ''}`,
    dataset: { action: 'remove', reader: id },
    'aria-label': `${confirming ? 'Confirm removing' : 'Remove'} reader ${id}`,
    onclick: () => remove(id),
  }, confirming ? 'Confirm' : 'Remove');
}

function readerRows(reader) {
  const { id, state, info } = reader;
  const row = h('tr', { dataset: { reader: id, state } },
    h('td', { 'data-label': 'reader' }, h('code', { title: info.consumer_name || id }, id)),
    h('td', { 'data-label': 'state' }, h('span', { class: `badge ${state}` }, state)),
    h('td', { 'data-label': 'model' }, info.model_name),
    h('td', { 'data-label': 'type' }, info.model_type ?? ''),
    h('td', { 'data-label': 'device' }, info.device),
    h('td', { class: 'num', 'data-label': 'pids' }, (info.pids ?? []).join(', ')),
    ageCell(reader),
    h('td', { 'data-label': '' }, h('div', { class: 'row' },
      h('button', { type: 'button', class: 'small', 'aria-expanded': String(open.has(id)), onclick: () => toggle(id) },
        open.has(id) ? 'Hide' : 'Details'),
      removeButton(id))));
  if (!open.has(id)) return [row];
  const detail = open.get(id);
  const body = detail === null ? 'Loading…' : detail instanceof Error ? detail.message : JSON.stringify(detail, null, 2);
  const why = detail?.error ? h('p', { class: 'notice error' }, `Why it is dead: ${detail.error}`) : null;
  return [row, h('tr', { class: 'detail' }, h('td', { colspan: 8 }, why, h('pre', { class: 'code' }, body)))];
}

function groupSection(group, readers, reserved) {
  const counts = STATES.map((state) => [state, readers.filter((reader) => reader.state === state).length])
    .filter(([, n]) => n)
    .map(([state, n]) => h('span', { class: `badge ${state}` }, `${n} ${state}`));
  return h('div', { class: 'group', dataset: { group } },
    h('div', { class: 'group-head' }, h('h3', {}, group), counts,
      reserved.includes(group) ? h('span', { class: 'badge', title: 'requests wait while no reader is live' }, 'reserved') : null),
    h('div', { class: 'table-wrap' }, h('table', { class: 'cards-on-phone' },
      h('thead', {}, h('tr', {}, ['Reader', 'State', 'Model', 'Type', 'Device', 'PIDs', 'Heartbeat', ''].map((name) => h('th', {}, name)))),
      h('tbody', {}, readers.flatMap(readerRows)))));
}

function render() {
  if (latest === null) return;
  const status = latest.status;
  const groups = byGroup(status);
  const key = JSON.stringify([[...groups], [...armed.keys()], [...open]], (name, value) => (name === 'heartbeat' ? undefined : value));
  if (key !== shown) {
    shown = key;
    const sections = [...groups].map(([group, readers]) => groupSection(group, readers, status.reserved_consumers ?? []));
    $('#groups').replaceChildren(...(sections.length ? sections : [h('p', { class: 'muted' }, 'No readers. Add one below.')]));
    $('#known-groups').replaceChildren(...[...groups.keys()].map((group) => h('option', { value: group })));
  } else {
    for (const [, readers] of groups) {
      for (const reader of readers) {
        const cell = document.querySelector(`tr[data-reader="${CSS.escape(reader.id)}"] td.age[data-ts]`);
        if (cell && reader.heartbeat) cell.dataset.ts = reader.heartbeat.heartbeat_timestamp;
      }
    }
  }
  for (const state of STATES) $(`#count-${state}`).textContent = Object.keys(status[`${state}_readers`]).length;
  updateAges();
}

async function poll() {
  try {
    latest = await (await request(`${await management()}/status`)).json();
    notify($('#error'), null);
    $('#updated').textContent = new Date().toLocaleTimeString([], { hour12: false });
    render();
  } catch (error) {
    notify($('#error'), `The readers could not be loaded: ${error.message}`);
  }
}

async function toggle(id) {
  if (open.has(id)) {
    open.delete(id);
    render();
    return;
  }
  open.set(id, null);
  render();
  try {
    open.set(id, await (await request(`${await management()}/reader/${encodeURIComponent(id)}`)).json());
  } catch (error) {
    if (open.has(id)) open.set(id, error);
  }
  if (open.has(id)) render();
}

async function remove(id) {
  if (!armed.has(id)) {
    armed.set(id, setTimeout(() => {
      armed.delete(id);
      render();
    }, 4000));
    render();
    return;
  }
  clearTimeout(armed.get(id));
  armed.delete(id);
  render();
  try {
    await request(`${await management()}/reader/${encodeURIComponent(id)}`, { method: 'DELETE' });
    open.delete(id);
    notify($('#add-result'), null);
  } catch (error) {
    notify($('#error'), `Reader ${id} could not be removed: ${error.message}`);
  }
  await poll();
}

/** The reader configuration from the form (ReaderConfig); throws on a field that cannot be sent. */
export function readerConfig() {
  const config = { model_name: $('#model_name').value.trim(), device: $('#device').value };
  const group = $('#consumer_group').value.trim();
  if (group) config.consumer_group = group;
  const batch = $('#max_batch_size').value.trim();
  if (batch) config.max_batch_size = Number(batch);
  const options = $('#backend_options').value.trim();
  if (options) {
    try {
      config.backend_options = JSON.parse(options);
    } catch (error) {
      throw new Error(`backend_options is not valid JSON: ${error.message}`);
    }
    if (typeof config.backend_options !== 'object' || Array.isArray(config.backend_options) || !config.backend_options) {
      throw new Error('backend_options must be a JSON object, like {"token_delay_ms": 20}');
    }
  }
  return config;
}

async function add(event) {
  event.preventDefault();
  const result = $('#add-result');
  $('#create').disabled = true;
  try {
    const config = readerConfig();
    const created = await (await postJSON(`${await management()}/reader`, config)).json();
    notify(result, `Reader ${created.reader_id} added to ${config.consumer_group ?? 'primary'}; it shows as loading until its model is loaded.`, 'ok');
    await poll();
  } catch (error) {
    notify(result, `The reader was not added: ${error.message}`);
  } finally {
    $('#create').disabled = false;
  }
}

$('#add').addEventListener('submit', add);

async function loop() {
  await poll();
  setTimeout(loop, POLL_MS);
}
loop();
setInterval(updateAges, 500);

