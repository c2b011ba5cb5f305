// Prometheus text exposition: a parser, and what the dashboard derives from two scrapes (rates, percentiles).

/** Parse the text format into a Map: sample name → [{labels, value}]. Comments and blank lines are skipped. */
export function parseMetrics(text) {
  const samples = new Map();
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const sample = parseLine(line);
    if (sample === null) continue;
    if (!samples.has(sample.name)) samples.set(sample.name, []);
    samples.get(sample.name).push({ labels: sample.labels, value: sample.value });
  }
  return samples;
}

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*/;
const ESCAPES = { '\\': '\\', '"': '"', n: '\n' };

function parseLine(line) {
  const name = NAME.exec(line)?.[0];
  if (!name) return null;
  let at = name.length;
  const labels = {};
  if (line[at] === '{') {
    at += 1;
    for (;;) {
      while (line[at] === ' ' || line[at] === ',') at += 1;
      if (line[at] === '}') {
        at += 1;
        break;
      }
      const key = NAME.exec(line.slice(at))?.[0];
      if (!key || line[at + key.length] !== '=' || line[at + key.length + 1] !== '"') return null;
      at += key.length + 2;
      let value = '';
      while (at < line.length && line[at] !== '"') {
        if (line[at] === '\\') {
          value += ESCAPES[line[at + 1]] ?? line[at + 1];
          at += 2;
        } else {
          value += line[at];
          at += 1;
        }
      }
      if (at >= line.length) return null;
      at += 1;
      labels[key] = value;
    }
  }
  const value = parseValue(line.slice(at).trim().split(/\s+/)[0]);
  return value === null ? null : { name, labels, value };
}

function parseValue(text) {
  if (text === '+Inf' || text === 'Inf') return Infinity;
  if (text === '-Inf') return -Infinity;
  if (text === 'NaN') return NaN;
  const value = Number(text);
  return text === '' || Number.isNaN(value) ? null : value;
}

/** The samples of the first of `names` that the scrape has (exporters differ on `_total` and unit suffixes). */
export function pick(samples, ...names) {
  for (const name of names) if (samples.has(name)) return samples.get(name);
  return [];
}

/** Sum of the samples by one label's value: Map value → sum (only the samples `keep` accepts). */
export function sumBy(list, label, keep = () => true) {
  const sums = new Map();
  for (const { labels, value } of list) {
    if (!keep(labels)) continue;
    const key = labels[label] ?? '';
    sums.set(key, (sums.get(key) ?? 0) + value);
  }
  return sums;
}

/** Cumulative histogram buckets summed over the series `keep` accepts: [[upper bound, count], ...] by bound. */
export function buckets(list, keep = () => true) {
  const counts = new Map();
  for (const { labels, value } of list) {
    if (!('le' in labels) || !keep(labels)) continue;
    const bound = parseValue(labels.le);
    counts.set(bound, (counts.get(bound) ?? 0) + value);
  }
  return [...counts.entries()].sort(([a], [b]) => a - b);
}

/** The growth of cumulative buckets from `before` to `after` (a counter reset counts from zero). */
export function bucketDelta(before, after) {
  const previous = new Map(before);
  return after.map(([bound, count]) => {
    const old = previous.get(bound) ?? 0;
    return [bound, count >= old ? count - old : count];
  });
}

/**
 * The q-quantile of cumulative buckets, interpolated linearly inside the bucket that holds it (as Prometheus'
 * histogram_quantile does); null when the buckets are empty. A quantile in the +Inf bucket is the largest bound.
 */
export function quantile(q, cumulative) {
  if (!cumulative.length) return null;
  const total = cumulative[cumulative.length - 1][1];
  if (!(total > 0)) return null;
  const rank = q * total;
  let lowerBound = 0;
  let lowerCount = 0;
  for (const [bound, count] of cumulative) {
    if (count >= rank) {
      if (bound === Infinity) return lowerBound;
      if (count === lowerCount) return bound;
      return lowerBound + ((bound - lowerBound) * (rank - lowerCount)) / (count - lowerCount);
    }
    lowerBound = bound;
    lowerCount = count;
  }
  return lowerBound;
}

/** Per-second growth of each counter of `after` since `before` (a counter reset counts from zero). */
export function rates(before, after, seconds) {
  const result = new Map();
  for (const [key, value] of after) {
    const old = before.get(key) ?? 0;
    result.set(key, (value >= old ? value - old : value) / seconds);
  }
  return result;
}

// Requests the dashboard does not count: the web UI's pages, files and API docs, and the dashboard's own scrapes.
const UI_PATHS = new Set(['/', '/playground', '/chat', '/readers', '/dashboard', '/api-docs', '/metrics', '/openapi.json', '/docs']);
export const isApiRequest = (labels) => !UI_PATHS.has(labels.path) && !labels.path?.startsWith('/ui/');

const REQUESTS = ['http_requests_total', 'http_requests'];
const DURATION = ['http_requests_duration_seconds_bucket'];
const TOKENS = ['generate_tokens_total', 'generate_tokens'];
const FIRST_TOKEN = ['time_to_first_token_seconds_bucket', 'time_to_first_token_bucket'];
const WAITING = ['liftoff_requests_waiting'];
const RUNNING = ['liftoff_requests_running'];

/**
 * What the dashboard charts at one moment, from the scrape `after` and the one `seconds` before it (`before`):
 * requests/s by port, latency p50/p99 (s), tokens/s by group, time to first token p50/p99 (s), requests waiting
 * and running by group. Percentiles are of the requests that finished between the two scrapes (null if none).
 */
export function derive(before, after, seconds) {
  const requests = rates(sumBy(pick(before, ...REQUESTS), 'port', isApiRequest),
    sumBy(pick(after, ...REQUESTS), 'port', isApiRequest), seconds);
  const latency = bucketDelta(buckets(pick(before, ...DURATION), isApiRequest), buckets(pick(after, ...DURATION), isApiRequest));
  const firstToken = bucketDelta(buckets(pick(before, ...FIRST_TOKEN)), buckets(pick(after, ...FIRST_TOKEN)));
  return {
    requests,
    latency: new Map([['p50', quantile(0.5, latency)], ['p99', quantile(0.99, latency)]]),
    tokens: rates(sumBy(pick(before, ...TOKENS), 'consumer_group'), sumBy(pick(after, ...TOKENS), 'consumer_group'), seconds),
    firstToken: new Map([['p50', quantile(0.5, firstToken)], ['p99', quantile(0.99, firstToken)]]),
    waiting: sumBy(pick(after, ...WAITING), 'consumer_group'),
    running: sumBy(pick(after, ...RUNNING), 'consumer_group'),
  };
}
