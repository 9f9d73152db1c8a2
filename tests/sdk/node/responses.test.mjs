// The Responses API through the official OpenAI Node SDK (`client.responses`).
//
// Run by tests/tests/it/sdk.rs in front of the mock provider (GATEWAY_BASE_URL,
// GATEWAY_API_KEY: a premium key with credit, GATEWAY_MODEL). The mock answers with
// REPLY, or with a call of the first tool when the user's text has `[tool]` and tools
// are offered.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import OpenAI from 'openai';

const REPLY = 'The capital of France is Paris.';
const WEATHER = {
  type: 'function',
  name: 'get_weather',
  description: 'The weather in a city',
  parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  strict: false,
};

function env(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set; run these tests through \`cargo nextest run -p tests -E 'test(/sdk/)'\``);
  }
  return value;
}

const baseURL = env('GATEWAY_BASE_URL');
const model = env('GATEWAY_MODEL');
const apiKey = env('GATEWAY_API_KEY');
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30_000 });

/** What the ledger charged the key's user for a response, in micro-USD. */
async function ledgerCharge(responseId) {
  const requestId = `req_${responseId.replace(/^resp_/, '')}`;
  const r = await fetch(`${baseURL.replace(/\/v1$/, '')}/api/llm/transactions?limit=100`, {
    headers: { Authorization: `Bearer ${apiKey}` },
  });
  assert.equal(r.status, 200);
  const lines = (await r.json()).data.filter((l) => l.requestId === requestId);
  assert.ok(lines.length > 0, `no ledger line for ${requestId}`);
  return -lines.reduce((sum, l) => sum + l.amountMicros, 0);
}

test('responses.create plain', async () => {
  const response = await client.responses.create({ model, input: 'What is the capital of France?', max_output_tokens: 32 });
  assert.equal(response.object, 'response');
  assert.equal(response.status, 'completed');
  assert.equal(response.output_text, REPLY);
  assert.equal(response.output[0].type, 'message');
  assert.equal(response.usage.output_tokens, 6);
  assert.equal(response.usage.total_tokens, response.usage.input_tokens + 6);
  assert.ok(response.usage.cost > 0);
  assert.equal(await ledgerCharge(response.id), Math.round(response.usage.cost * 1e6));
});

test('responses.create streamed: typed events in order, ending with response.completed', async () => {
  const stream = await client.responses.create({ model, input: 'What is the capital of France?', stream: true });
  const events = [];
  for await (const event of stream) events.push(event);
  const types = events.map((e) => e.type);
  assert.deepEqual(types.slice(0, 4), [
    'response.created',
    'response.in_progress',
    'response.output_item.added',
    'response.content_part.added',
  ]);
  assert.equal(types.at(-1), 'response.completed');
  assert.deepEqual(
    events.map((e) => e.sequence_number),
    events.map((_, i) => i),
  );
  const text = events.filter((e) => e.type === 'response.output_text.delta').map((e) => e.delta).join('');
  assert.equal(text, REPLY);
  const done = events.at(-1).response;
  assert.equal(done.usage.output_tokens, 6);
  assert.equal(await ledgerCharge(done.id), Math.round(done.usage.cost * 1e6));
});

test('previous_response_id, retrieve and delete', async () => {
  const first = await client.responses.create({ model, input: 'What is the capital of France?' });
  const second = await client.responses.create({ model, input: 'And of Germany?', previous_response_id: first.id });
  assert.equal(second.previous_response_id, first.id);
  assert.ok(
    second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens,
    `the second input (${second.usage.input_tokens}) includes the first exchange`,
  );
  const got = await client.responses.retrieve(second.id);
  assert.equal(got.id, second.id);
  assert.equal(got.output_text, REPLY);
  await client.responses.delete(second.id);
  await assert.rejects(client.responses.retrieve(second.id), (err) => {
    assert.ok(err instanceof OpenAI.NotFoundError, `got ${err?.constructor?.name}: ${err}`);
    return true;
  });
  await assert.rejects(client.responses.create({ model, input: 'x', previous_response_id: second.id }), (err) => {
    assert.ok(err instanceof OpenAI.NotFoundError, `got ${err?.constructor?.name}: ${err}`);
    assert.equal(err.param, 'previous_response_id');
    return true;
  });
});

test('function tool round trip', async () => {
  const first = await client.responses.create({ model, input: '[tool] What is the weather in Paris?', tools: [WEATHER] });
  const calls = first.output.filter((item) => item.type === 'function_call');
  assert.equal(calls.length, 1);
  assert.equal(calls[0].name, 'get_weather');
  assert.deepEqual(JSON.parse(calls[0].arguments), { city: 'Paris' });
  const second = await client.responses.create({
    model,
    previous_response_id: first.id,
    tools: [WEATHER],
    input: [{ type: 'function_call_output', call_id: calls[0].call_id, output: JSON.stringify({ sky: 'sunny' }) }],
  });
  assert.equal(second.output_text, REPLY);
});
