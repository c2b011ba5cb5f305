// The chat: multi-turn, streamed from POST /v1/chat/completions on the OpenAI port; Stop aborts the request, and
// the server cancels the generation at the reader when the connection closes.
import { $, fillGroups, formatMs, formatNumber, h, notify, portUrl, postJSON, sseEvents } from './common.js';

const history = []; // {role, content} of the conversation so far
let controller = null;

function number(id) {
  const raw = $(`#${id}`).value.trim();
  return raw === '' ? undefined : Number(raw);
}

function requestBody() {
  const system = $('#system').value.trim();
  return {
    model: $('#group').value,
    messages: system ? [{ role: 'system', content: system }, ...history] : [...history],
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: number('max_tokens'),
    temperature: number('temperature'),
    top_p: number('top_p'),
  };
}

/** Keep the conversation scrolled to its end, unless the reader has scrolled up. */
function follow(force = false) {
  const box = $('#messages');
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 80) box.scrollTop = box.scrollHeight;
}

function bubble(role, text) {
  $('.chat-empty')?.remove();
  const content = h('span', { class: 'content' }, text);
  const element = h('div', { class: `msg ${role}`, dataset: { role } }, content);
  $('#messages').append(element);
  follow(true);
  return { element, content };
}

function setStreaming(streaming) {
  $('#send').disabled = streaming;
  $('#stop').classList.toggle('hidden', !streaming);
  $('#messages').setAttribute('aria-busy', String(streaming));
}

/** Stream one reply into `reply`; answers {text, finish, usage, first} (first: time of the first piece). */
async function streamReply(body, reply, signal) {
  const response = await postJSON(`${await portUrl('openai')}/v1/chat/completions`, body, { signal });
  const result = { text: '', finish: null, usage: null, first: null };
  for await (const { data } of sseEvents(response)) {
    if (data === '[DONE]') break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(`${chunk.error.code ?? chunk.error.type}: ${chunk.error.message}`);
    if (chunk.usage) result.usage = chunk.usage;
    const choice = chunk.choices?.[0];
    if (!choice) continue;
    if (choice.delta?.content) {
      result.first ??= performance.now();
      result.text += choice.delta.content;
      reply.content.textContent = result.text;
      follow();
    }
    if (choice.finish_reason) result.finish = choice.finish_reason;
  }
  return result;
}

function describe(result, sent, stopped) {
  const parts = [];
  if (result.first !== null) parts.push(`first token ${formatMs(result.first - sent)}`);
  const tokens = result.usage?.completion_tokens;
  if (tokens) {
    parts.push(`${tokens} tokens`);
    const seconds = (performance.now() - (result.first ?? sent)) / 1000;
    if (tokens > 1 && seconds > 0.005) parts.push(`${formatNumber((tokens - 1) / seconds)} tokens/s`);
  }
  parts.push(stopped ? 'stopped' : (result.finish ?? 'done'));
  return parts.join(' · ');
}

async function send(text) {
  notify($('#error'), null);
  await groupsLoading; // a message typed while the groups still load waits for them instead of failing
  if (!$('#group').value) {
    notify($('#error'), 'No consumer group to talk to: add a reader on the Readers page.');
    return;
  }
  history.push({ role: 'user', content: text });
  bubble('user', text);
  const reply = bubble('assistant', '');
  reply.element.setAttribute('aria-busy', 'true');
  const body = requestBody();
  const sent = performance.now();
  controller = new AbortController();
  setStreaming(true);
  const partial = { text: '', finish: null, usage: null, first: null };
  let stopped = false;
  try {
    Object.assign(partial, await streamReply(body, reply, controller.signal));
  } catch (error) {
    if (error.name === 'AbortError') {
      stopped = true;
    } else {
      reply.element.classList.add('error');
      reply.content.textContent = error.message;
      history.pop();
      notify($('#error'), error);
    }
  } finally {
    reply.element.removeAttribute('aria-busy');
    controller = null;
    setStreaming(false);
  }
  partial.text = reply.content.textContent;
  if (!reply.element.classList.contains('error')) {
    history.push({ role: 'assistant', content: partial.text });
    reply.element.dataset.state = stopped ? 'stopped' : 'done';
    reply.element.append(h('span', { class: 'meta' }, describe(partial, sent, stopped)));
  }
  follow();
}

async function loadGroups() {
  try {
    await fillGroups($('#group'), { emptyText: 'no readers: add one on the Readers page' });
  } catch (error) {
    notify($('#error'), error);
  }
}

$('#composer').addEventListener('submit', (event) => {
  event.preventDefault();
  const text = $('#input').value.trim();
  if (!text || controller) return;
  $('#input').value = '';
  send(text);
});
$('#input').addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $('#composer').requestSubmit();
  }
});
$('#stop').addEventListener('click', () => controller?.abort());
$('#clear').addEventListener('click', () => {
  controller?.abort();
  history.length = 0;
  $('#messages').replaceChildren(h('p', { class: 'chat-empty' }, 'Say something to start.'));
  notify($('#error'), null);
});
$('#refresh').addEventListener('click', () => {
  groupsLoading = loadGroups();
});
let groupsLoading = loadGroups();
