// The metrics dashboard: scrape GET /metrics on the management port every 2 s, keep 5 minutes of what is derived
// from consecutive scrapes, and chart it.
import { LineChart } from './chart.js';
import { $, config, formatMs, formatNumber, notify, portUrl, request } from './common.js';
import { derive, parseMetrics } from './prom.js';

const POLL_MS = 2000;
const WINDOW_S = 300;

const seconds = (value) => formatMs(value * 1000);
const CHARTS = {
  requests: formatNumber,
  latency: seconds,
  tokens: formatNumber,
  firstToken: seconds,
  waiting: formatNumber,
  running: formatNumber,
};

const charts = Object.fromEntries(Object.entries(CHARTS).map(([key, format]) =>
  [key, new LineChart($(`#chart-${key}`), { format, legend: $(`#legend-${key}`) })]));
const points = []; // [{t, derived}] of the last WINDOW_S seconds
let previous = null; // {t, samples} of the last scrape
let portNames = new Map(); // port number → its name in config.json

/** The chart series of one derived key: one line per name (port, group, percentile) seen in the window. */
function seriesOf(key) {
  const names = new Set();
  for (const { derived } of points) for (const name of derived[key].keys()) names.add(name);
  const label = (name) => (key === 'requests' ? `${portNames.get(name) ?? 'port'} ${name}` : name);
  return [...names].sort().map((name) => ({
    name: label(name),
    points: points.map(({ t, derived }) => [t, derived[key].get(name) ?? (key === 'latency' || key === 'firstToken' ? null : 0)]),
  }));
}

const total = (map) => [...map.values()].reduce((sum, value) => sum + (value ?? 0), 0);

function show(now) {
  // the x axis spans the last 5 minutes, or less (but at least one) while the page has seen less
  const start = Math.max(now - WINDOW_S, Math.min(points[0]?.t ?? now, now - 60));
  for (const [key, chart] of Object.entries(charts)) chart.update(seriesOf(key), [start, now]);
  const last = points[points.length - 1]?.derived;
  if (!last) return;
  $('#now-requests').textContent = formatNumber(total(last.requests));
  $('#now-p50').textContent = last.latency.get('p50') === null ? '–' : seconds(last.latency.get('p50'));
  $('#now-p99').textContent = last.latency.get('p99') === null ? '–' : seconds(last.latency.get('p99'));
  $('#now-tokens').textContent = formatNumber(total(last.tokens));
  $('#now-waiting').textContent = formatNumber(total(last.waiting));
  $('#now-running').textContent = formatNumber(total(last.running));
}

async function scrape() {
  const url = `${await portUrl('management')}/metrics`;
  let response;
  try {
    response = await request(url, { cache: 'no-store' });
  } catch (error) {
    if (error.status === 404) {
      throw new Error('This server does not serve metrics (enable_metrics is false): start it with enable_metrics: true.');
    }
    throw error;
  }
  return parseMetrics(await response.text());
}

async function tick() {
  const t = Date.now() / 1000;
  try {
    const samples = await scrape();
    if (previous !== null && t > previous.t) {
      points.push({ t, derived: derive(previous.samples, samples, t - previous.t) });
      while (points.length && points[0].t < t - WINDOW_S) points.shift();
    }
    previous = { t, samples };
    notify($('#error'), null);
  } catch (error) {
    notify($('#error'), error);
  }
  show(t);
}

async function start() {
  try {
    const { ports, enable_metrics: enabled } = await config();
    portNames = new Map(Object.entries(ports).map(([name, port]) => [String(port), name]));
    if (!enabled) notify($('#error'), 'Metrics are off on this server (enable_metrics: false).');
  } catch (error) {
    notify($('#error'), error);
  }
  await tick();
  setInterval(tick, POLL_MS);
}

start();
