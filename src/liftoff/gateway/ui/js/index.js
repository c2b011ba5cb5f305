// The landing page: links to the pages, the readers at a glance and the gateway's ports.
import { $, config, h, notify, portUrl, request } from './common.js';

const SERVES = {
  inference: 'native API (/generate, /generate_stream, /embed, ...) and this web UI',
  management: 'readers, /status, /metrics',
  vertex: 'Google Vertex AI',
  openai: 'OpenAI-compatible API (/v1/...)',
  snowflake: 'Snowflake external functions',
  sagemaker: 'Amazon SageMaker (/invocations, /ping)',
  internal: 'readers connect here',
};

async function showPorts() {
  const { ports } = await config();
  const rows = [];
  for (const [name, port] of Object.entries(ports)) {
    const base = await portUrl(name);
    rows.push(h('tr', {},
      h('td', { class: 'num' }, String(port)),
      h('td', {}, h('strong', {}, name), ' — ', SERVES[name] ?? ''),
      h('td', {}, h('a', { href: `/api-docs#${name}` }, 'endpoints'), ' · ', h('a', { href: `${base}/docs` }, 'Swagger UI'))));
  }
  $('#ports').replaceChildren(...rows);
}

async function showStatus() {
  try {
    const body = await (await request(`${await portUrl('management')}/status`)).json();
    const status = body.status;
    const groups = new Set();
    for (const key of ['live_readers', 'loading_readers']) {
      for (const info of Object.values(status[key])) info.consumer_groups.forEach((group) => groups.add(group));
    }
    $('#live').textContent = Object.keys(status.live_readers).length;
    $('#loading').textContent = Object.keys(status.loading_readers).length;
    $('#dead').textContent = Object.keys(status.dead_readers).length;
    $('#groups').textContent = groups.size;
    $('#live').classList.add('loaded');
    notify($('#error'), null);
  } catch (error) {
    notify($('#error'), error);
  }
}

showPorts().catch((error) => notify($('#error'), error));
showStatus();
setInterval(showStatus, 3000);
