"""The Responses API through the official OpenAI Python SDK against the real worker.

Run by `tests/tests/it/real_worker.rs` (not by pytest: the model is slow to start) with
GATEWAY_BASE_URL, GATEWAY_API_KEY and GATEWAY_MODEL; exits non-zero on a failure.
"""

import os

import openai

client = openai.OpenAI(base_url=os.environ["GATEWAY_BASE_URL"], api_key=os.environ["GATEWAY_API_KEY"], max_retries=0, timeout=120)
model = os.environ["GATEWAY_MODEL"]

first = client.responses.create(model=model, input="What is the capital of France?", temperature=0, max_output_tokens=64)
assert first.status in ("completed", "incomplete"), first
assert "Paris" in first.output_text, first.output_text

events = list(
    client.responses.create(
        model=model, input="Name one planet.", previous_response_id=first.id, temperature=0, max_output_tokens=32, stream=True
    )
)
types = [e.type for e in events]
assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete"), types
second = events[-1].response
text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
assert text and text == second.output_text, (text, second.output_text)
# The replayed first exchange is part of the second call's input.
assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens, (first.usage, second.usage)
assert client.responses.retrieve(second.id).output_text == second.output_text
print("python responses against the real worker: ok")
