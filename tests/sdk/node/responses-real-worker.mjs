// The Responses API through the official OpenAI Node SDK against the real worker.
// Run by tests/tests/it/real_worker.rs (not by `node --test`) with GATEWAY_BASE_URL,
// GATEWAY_API_KEY and GATEWAY_MODEL; exits non-zero on a failure.

import assert from 'node:assert/strict';

import OpenAI from 'openai';

const client = new OpenAI({ baseURL: process.env.GATEWAY_BASE_URL, apiKey: process.env.GATEWAY_API_KEY, maxRetries: 0, timeout: 120_000 });
const model = process.env.GATEWAY_MODEL;

const first = await client.responses.create({ model, input: 'What is the capital of France?', temperature: 0, max_output_tokens: 64 });
assert.ok(first.output_text.includes('Paris'), first.output_text);
const stream = await client.responses.create({ model, input: 'Name one planet.', previous_response_id: first.id, temperature: 0, max_output_tokens: 32, stream: true });
const events = [];
for await (const event of stream) events.push(event);
assert.equal(events[0].type, 'response.created');
assert.ok(['response.completed', 'response.incomplete'].includes(events.at(-1).type), events.at(-1).type);
const second = events.at(-1).response;
assert.ok(second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens, JSON.stringify([first.usage, second.usage]));
console.log('node responses against the real worker: ok');
