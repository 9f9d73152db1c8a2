"""The Responses API through the official OpenAI Python SDK (`client.responses`).

Run by `tests/tests/it/sdk.rs` in front of the mock provider (GATEWAY_BASE_URL,
GATEWAY_API_KEY: a premium key with credit, GATEWAY_FREE_KEY, GATEWAY_MODEL). The mock
answers with REPLY, or with a call of the first tool when the user's text has `[tool]`
and tools are offered.
"""

import json
import os
import urllib.request

import openai
import pytest

REPLY = "The capital of France is Paris."
TECH = "How do I fix this Rust compiler error in my Python and Rust code?"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set; run these tests through `cargo nextest run -p tests -E 'test(/sdk/)'`")
    return value


def client(key_var: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=env("GATEWAY_BASE_URL"), api_key=env(key_var), max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def premium() -> openai.OpenAI:
    return client("GATEWAY_API_KEY")


@pytest.fixture(scope="module")
def model() -> str:
    return env("GATEWAY_MODEL")


def ledger_charge(response_id: str) -> int:
    """What the ledger charged the premium key's user for this response, in micro-USD."""
    base = env("GATEWAY_BASE_URL").removesuffix("/v1")
    request_id = "req_" + response_id.removeprefix("resp_")
    req = urllib.request.Request(
        f"{base}/api/llm/transactions?limit=100", headers={"Authorization": f"Bearer {env('GATEWAY_API_KEY')}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        lines = json.load(r)["data"]
    charges = [line["amountMicros"] for line in lines if line["requestId"] == request_id]
    assert charges, f"no ledger line for {request_id}"
    return -sum(charges)


def test_create_plain(premium, model):
    response = premium.responses.create(model=model, input="What is the capital of France?", max_output_tokens=32)
    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text == REPLY
    assert response.output[0].type == "message"
    assert response.output[0].content[0].text == REPLY
    assert response.usage.output_tokens == 6
    assert response.usage.total_tokens == response.usage.input_tokens + 6
    # Usage carries our cost, which is what the ledger charged.
    cost = response.usage.model_extra["cost"]
    assert cost > 0
    assert ledger_charge(response.id) == round(cost * 1_000_000)


def test_stream_events_in_order_end_with_completed(premium, model):
    events = list(premium.responses.create(model=model, input="What is the capital of France?", stream=True))
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == REPLY
    completed = events[-1].response
    assert completed.output_text == REPLY
    assert completed.usage.output_tokens == 6
    assert ledger_charge(completed.id) == round(completed.usage.model_extra["cost"] * 1_000_000)


def test_previous_response_id_retrieve_and_delete(premium, model):
    first = premium.responses.create(model=model, input="What is the capital of France?")
    second = premium.responses.create(model=model, input="And of Germany?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # The second call's input includes the first exchange.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens

    got = premium.responses.retrieve(second.id)
    assert got.id == second.id
    assert got.output_text == REPLY
    premium.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        premium.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError) as e:
        premium.responses.create(model=model, input="x", previous_response_id=second.id)
    assert e.value.param == "previous_response_id"


def test_function_tool_round_trip(premium, model):
    first = premium.responses.create(model=model, input="[tool] What is the weather in Paris?", tools=[WEATHER])
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    second = premium.responses.create(
        model=model,
        previous_response_id=first.id,
        tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"sky": "sunny"})}],
    )
    assert second.output_text == REPLY


def test_unsupported_input_is_a_400_naming_the_param(premium, model):
    with pytest.raises(openai.BadRequestError) as e:
        premium.responses.create(
            model=model,
            input=[{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}],
        )
    assert e.value.param == "input[0].content[0].type"
    with pytest.raises(openai.BadRequestError) as e:
        premium.responses.create(model=model, input="x", tools=[{"type": "web_search"}])
    assert e.value.param == "tools[0].type"


def test_free_answer_ends_with_the_ad_item():
    free = client("GATEWAY_FREE_KEY")
    response = free.responses.create(model=env("GATEWAY_MODEL"), input=TECH)
    assert len(response.output) == 2
    assert response.output[0].content[0].text == REPLY
    ad = response.output[1]
    assert ad.id.startswith("msg_ad_")
    assert "[Sponsored] FastIDE" in ad.content[0].text
