// The gateway through the official OpenAI Node SDK, as a user would call it.
//
// Run by tests/tests/it/sdk.rs, which starts the gateway binary in front of the mock
// provider and passes GATEWAY_BASE_URL (…/v1), GATEWAY_API_KEY and GATEWAY_MODEL.
// The mock answers every request with REPLY, one word per chunk.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import OpenAI from 'openai';

const REPLY = 'The capital of France is Paris.';

function env(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set; run these tests through \`cargo nextest run -p tests -E 'test(/sdk/)'\``);
  }
  return value;
}

const baseURL = env('GATEWAY_BASE_URL');
const model = env('GATEWAY_MODEL');
// No retries: every failure must surface at once, with the class the SDK picks.
const client = new OpenAI({ baseURL, apiKey: env('GATEWAY_API_KEY'), maxRetries: 0, timeout: 30_000 });
const ask = (text = 'What is the capital of France?') => [{ role: 'user', content: text }];

test('list models includes the served model', async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.ok(ids.includes(model), `models: ${ids}`);
  assert.equal((await client.models.retrieve(model)).id, model);
});

test('non-stream chat', async () => {
  const completion = await client.chat.completions.create({ model, messages: ask(), max_tokens: 32 });
  assert.equal(completion.object, 'chat.completion');
  assert.equal(completion.choices[0].message.role, 'assistant');
  assert.equal(completion.choices[0].message.content, REPLY);
  assert.equal(completion.choices[0].finish_reason, 'stop');
  assert.equal(completion.usage.completion_tokens, 6);
  assert.equal(completion.usage.total_tokens, completion.usage.prompt_tokens + 6);
});

test('stream with include_usage ends with a usage chunk', async () => {
  const stream = await client.chat.completions.create({
    model,
    messages: ask(),
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  const text = chunks.filter((c) => c.choices.length).map((c) => c.choices[0].delta.content ?? '').join('');
  assert.equal(text, REPLY);
  const last = chunks.at(-1);
  assert.deepEqual(last.choices, []);
  assert.equal(last.usage.completion_tokens, 6);
  assert.ok(chunks.slice(0, -1).every((c) => c.usage == null), 'only the final chunk carries usage');
});

test('stop is accepted', async () => {
  const completion = await client.chat.completions.create({ model, messages: ask(), stop: ['\n\n', '<<node-stop>>'] });
  assert.equal(completion.choices[0].message.content, REPLY);
});

test('bad key raises AuthenticationError', async () => {
  const bad = new OpenAI({ baseURL, apiKey: 'sk-not-a-real-key', maxRetries: 0 });
  await assert.rejects(bad.chat.completions.create({ model, messages: ask() }), (err) => {
    assert.ok(err instanceof OpenAI.AuthenticationError, `got ${err?.constructor?.name}: ${err}`);
    assert.equal(err.status, 401);
    assert.equal(err.code, 'invalid_api_key');
    return true;
  });
});

test('unknown model raises NotFoundError', async () => {
  await assert.rejects(client.chat.completions.create({ model: 'no-such-model', messages: ask() }), (err) => {
    assert.ok(err instanceof OpenAI.NotFoundError, `got ${err?.constructor?.name}: ${err}`);
    assert.equal(err.status, 404);
    assert.equal(err.code, 'model_not_found');
    return true;
  });
});

test('bad parameter raises BadRequestError', async () => {
  await assert.rejects(client.chat.completions.create({ model, messages: ask(), temperature: 5 }), (err) => {
    assert.ok(err instanceof OpenAI.BadRequestError, `got ${err?.constructor?.name}: ${err}`);
    assert.equal(err.status, 400);
    assert.equal(err.param, 'temperature');
    assert.equal(err.type, 'invalid_request_error');
    return true;
  });
});

test('mid-stream provider failure raises APIError while iterating', async () => {
  const stream = await client.chat.completions.create({ model, messages: ask('[fail-mid] tell me'), stream: true });
  let received = '';
  await assert.rejects(
    (async () => {
      for await (const chunk of stream) received += chunk.choices[0]?.delta?.content ?? '';
    })(),
    (err) => {
      assert.ok(err instanceof OpenAI.APIError, `got ${err?.constructor?.name}: ${err}`);
      // The failure comes inside a 200 stream, so it carries no HTTP status.
      assert.equal(err.status, undefined);
      return true;
    },
  );
  assert.equal(received, 'The capital');
});

test('legacy completions', async () => {
  const completion = await client.completions.create({ model, prompt: 'The capital of France is', max_tokens: 16 });
  assert.equal(completion.object, 'text_completion');
  assert.equal(completion.choices[0].text, REPLY);
  assert.equal(completion.usage.completion_tokens, 6);
});
