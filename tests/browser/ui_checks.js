// Run in the page by test_ui.py (page.evaluate): the UI's own JavaScript helpers on known inputs.
async () => {
  const prom = await import('/ui/js/prom.js');
  const common = await import('/ui/js/common.js');
  const text = [
    '# HELP http_requests_total HTTP requests answered.',
    '# TYPE http_requests_total counter',
    'http_requests_total{method="POST",path="/generate",port="3000",status="200"} 10.0',
    'http_requests_total{method="GET",path="/ui/{path:path}",port="3000",status="200"} 99.0',
    'http_requests_total{method="POST",path="/v1/chat/completions",port="3003",status="200"} 4',
    'odd_label{text="a \\"quoted\\" \\\\ back\\nslash",le="+Inf"} 1e3',
    'no_labels 7',
  ].join('\n');
  const parsed = prom.parseMetrics(text);
  const buckets = [[0.1, 0], [0.5, 50], [1, 90], [Infinity, 100]];
  const before = prom.parseMetrics([
    'generate_tokens{consumer_group="a"} 100',
    'http_requests_total{port="3000",path="/generate"} 10',
  ].join('\n'));
  const after = prom.parseMetrics([
    'generate_tokens{consumer_group="a"} 300',
    'http_requests_total{port="3000",path="/generate"} 30',
    'liftoff_requests_waiting{consumer_group="a"} 3',
  ].join('\n'));
  const derived = prom.derive(before, after, 2);

  // an event stream cut at awkward places
  const chunks = ['data: one\n', '\ndata:  two\ndata: lines\n\nevent: metadata\nda', 'ta: {"n": 1}\n\n: comment\n\n'];
  const stream = new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(new TextEncoder().encode(chunk));
      controller.close();
    },
  });
  const events = [];
  for await (const event of common.sseEvents(new Response(stream))) events.push(event);

  return {
    byPort: Object.fromEntries(prom.sumBy(parsed.get('http_requests_total'), 'port', prom.isApiRequest)),
    odd: parsed.get('odd_label'),
    plain: parsed.get('no_labels'),
    p50: prom.quantile(0.5, buckets),
    p95: prom.quantile(0.95, buckets),
    p999: prom.quantile(0.999, buckets),
    empty: prom.quantile(0.5, [[1, 0], [Infinity, 0]]),
    tokens: Object.fromEntries(derived.tokens),
    requests: Object.fromEntries(derived.requests),
    waiting: Object.fromEntries(derived.waiting),
    events,
    ms: [common.formatMs(0), common.formatMs(0.25), common.formatMs(42.4), common.formatMs(1500)],
  };
}
