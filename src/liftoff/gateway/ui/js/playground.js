// The playground: one prompt, every generation parameter, streamed through POST /generate_stream.
import { $, fillGroups, formatMs, formatNumber, notify, postJSON, sseEvents } from './common.js';

const form = $('#form');
let controller = null;

/** The request body from the form; empty fields are left out (the server's defaults apply). */
export function requestBody() {
  const body = { text: $('#prompt').value, consumer_group: $('#group').value || undefined, return_metadata: true };
  for (const input of form.querySelectorAll('[data-field]')) {
    const name = input.dataset.field;
    const type = input.dataset.type;
    if (type === 'bool') {
      if (input.checked) body[name] = true;
      continue;
    }
    const raw = input.value.trim();
    if (raw === '') continue;
    if (type === 'int' || type === 'float') {
      const value = Number(raw);
      if (!Number.isFinite(value) || (type === 'int' && !Number.isInteger(value))) {
        throw new Error(`${name} must be ${type === 'int' ? 'a whole number' : 'a number'}, not "${raw}"`);
      }
      body[name] = value;
    } else if (type === 'json') {
      try {
        body[name] = JSON.parse(raw);
      } catch (error) {
        throw new Error(`${name} is not valid JSON: ${error.message}`);
      }
    } else {
      body[name] = input.value;
    }
  }
  return body;
}

function curlOf(body) {
  const json = JSON.stringify(body).replaceAll("'", "'\\''");
  return `curl -sN ${location.origin}/generate_stream \\\n  -H 'content-type: application/json' \\\n  -d '${json}'`;
}

/** Timing of one stream: send time, first and last token times, token count. */
class Timer {
  constructor() {
    this.sent = performance.now();
    this.first = null;
    this.last = null;
    this.tokens = 0;
  }

  token() {
    this.last = performance.now();
    this.first ??= this.last;
    this.tokens += 1;
  }

  /** Tokens per second after the first token (the decoding rate); over the whole request if that is too short. */
  rate(tokens = this.tokens) {
    if (this.first === null) return null;
    const decoding = (this.last - this.first) / 1000;
    if (tokens > 1 && decoding >= 0.005) return (tokens - 1) / decoding;
    const total = (this.last - this.sent) / 1000;
    return total > 0 ? tokens / total : null;
  }
}

function showStats(timer, tokens = timer.tokens) {
  $('#ttft').textContent = timer.first === null ? '–' : formatMs(timer.first - timer.sent);
  $('#rate').textContent = formatNumber(timer.rate(tokens));
  $('#tokens').textContent = String(tokens);
  $('#elapsed').textContent = formatMs(performance.now() - timer.sent);
}

function setRunning(running) {
  $('#generate').disabled = running;
  $('#stop').disabled = !running;
  form.setAttribute('aria-busy', String(running));
}

async function generate() {
  notify($('#error'), null);
  let body;
  try {
    body = requestBody();
  } catch (error) {
    notify($('#error'), error);
    return;
  }
  $('#curl').textContent = curlOf(body);
  $('#output').textContent = '';
  $('#meta').textContent = '';
  $('#finish').textContent = '…';
  const output = $('#output');
  if (matchMedia('(max-width: 820px)').matches) output.scrollIntoView({ block: 'center' }); // one column: show it
  const timer = new Timer();
  let counted = null; // the reader's count of generated tokens, from the metadata event
  controller = new AbortController();
  setRunning(true);
  showStats(timer);
  try {
    const response = await postJSON('/generate_stream', body, { signal: controller.signal });
    for await (const { event, data } of sseEvents(response)) {
      if (event === 'message') {
        timer.token();
        output.append(data);
        output.scrollTop = output.scrollHeight;
        showStats(timer);
      } else if (event === 'metadata') {
        const meta = JSON.parse(data);
        counted = meta.completion_tokens;
        showStats(timer, counted);
        $('#finish').textContent = meta.finish_reason;
        $('#meta').textContent = `${meta.prompt_tokens} prompt tokens · ${meta.completion_tokens} generated · reader ${meta.reader_id}`;
      } else if (event === 'error') {
        const error = JSON.parse(data);
        throw new Error(`${error.error_type}: ${error.detail}`);
      }
    }
    if ($('#finish').textContent === '…') $('#finish').textContent = 'done';
  } catch (error) {
    if (error.name === 'AbortError') {
      $('#finish').textContent = 'stopped';
    } else {
      $('#finish').textContent = 'error';
      notify($('#error'), error);
    }
  } finally {
    showStats(timer, counted ?? timer.tokens);
    controller = null;
    setRunning(false);
  }
}

async function loadGroups() {
  try {
    await fillGroups($('#group'), { emptyText: 'no readers: add one on the Readers page' });
  } catch (error) {
    notify($('#error'), error);
  }
}

form.addEventListener('submit', (event) => {
  event.preventDefault();
  generate();
});
$('#stop').addEventListener('click', () => controller?.abort());
$('#refresh').addEventListener('click', loadGroups);
$('#prompt').addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) form.requestSubmit();
});
loadGroups();
