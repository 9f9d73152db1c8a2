"""The gateway through the official OpenAI Python SDK, as a user would call it.

Run by `tests/tests/it/sdk.rs`, which starts the gateway binary in front of the mock
provider and passes GATEWAY_BASE_URL (…/v1), GATEWAY_API_KEY and GATEWAY_MODEL.
The mock answers every request with REPLY, one word per chunk.
"""

import os

import openai
import pytest

REPLY = "The capital of France is Paris."

# The Rust driver looks for this stop sequence in what the mock provider received.
STOP_MARKER = "<<py-stop>>"


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set; run these tests through `cargo nextest run -p tests -E 'test(/sdk/)'`")
    return value


@pytest.fixture(scope="module")
def model() -> str:
    return env("GATEWAY_MODEL")


@pytest.fixture(scope="module")
def client() -> openai.OpenAI:
    # No retries: every failure must surface at once, with the class the SDK picks.
    return openai.OpenAI(base_url=env("GATEWAY_BASE_URL"), api_key=env("GATEWAY_API_KEY"), max_retries=0, timeout=30)


def ask(text: str = "What is the capital of France?"):
    return [{"role": "user", "content": text}]


def test_list_models_includes_the_served_model(client, model):
    ids = [m.id for m in client.models.list()]
    assert model in ids
    assert client.models.retrieve(model).id == model


def test_non_stream_chat(client, model):
    completion = client.chat.completions.create(model=model, messages=ask(), max_tokens=32)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 6


def test_stream_with_include_usage_ends_with_a_usage_chunk(client, model):
    stream = client.chat.completions.create(
        model=model, messages=ask(), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 6
    # Only the final chunk carries usage.
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=ask(), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert all(c.choices for c in chunks)


def test_stop_is_accepted(client, model):
    completion = client.chat.completions.create(model=model, messages=ask(), stop=["\n\n", STOP_MARKER])
    assert completion.choices[0].message.content == REPLY


def test_max_tokens_cuts_the_reply(client, model):
    completion = client.chat.completions.create(model=model, messages=ask(), max_tokens=2)
    assert completion.choices[0].message.content == "The capital"
    assert completion.choices[0].finish_reason == "length"


def test_bad_key_raises_authentication_error(model):
    bad = openai.OpenAI(base_url=env("GATEWAY_BASE_URL"), api_key="sk-not-a-real-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model=model, messages=ask())
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"


def test_unknown_model_raises_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=ask())
    assert err.value.status_code == 404
    assert err.value.code == "model_not_found"


def test_bad_parameter_raises_bad_request_error(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=ask(), temperature=5)
    assert err.value.status_code == 400
    assert err.value.param == "temperature"
    assert err.value.type == "invalid_request_error"


def test_mid_stream_provider_failure_raises_api_error_while_iterating(client, model):
    stream = client.chat.completions.create(model=model, messages=ask("[fail-mid] tell me"), stream=True)
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")
    # The tokens before the failure were delivered; the failure is not a status error.
    assert "".join(received) == "The capital"
    assert not isinstance(err.value, openai.APIStatusError)


def test_legacy_completions(client, model):
    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == REPLY
    assert completion.usage is not None and completion.usage.completion_tokens == 6


def test_legacy_completions_stream(client, model):
    stream = client.completions.create(model=model, prompt="The capital of France is", stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == REPLY


def test_sdk_retry_honours_retry_after_after_a_rate_limit(model):
    """The SDK's own retry succeeds after a 429 by waiting what `retry-after(-ms)` says."""
    import json
    import time
    import urllib.request

    base = env("GATEWAY_BASE_URL")
    root = base.rsplit("/v1", 1)[0]
    body = json.dumps({"name": "py-rate-limited", "tier": "free", "requestsPerMinute": 30}).encode()
    request = urllib.request.Request(
        f"{root}/api/admin/keys",
        data=body,
        headers={"Authorization": f"Bearer {env('GATEWAY_ADMIN_KEY')}", "Content-Type": "application/json"},
    )
    key = json.load(urllib.request.urlopen(request))["key"]
    strict = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=30)
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(31):
            strict.chat.completions.create(model=model, messages=ask(), max_tokens=4)
    headers = refused.value.response.headers
    retry_ms = int(headers["retry-after-ms"])
    assert 0 < retry_ms <= 2000, "30 requests/min frees one every 2 s"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    patient = openai.OpenAI(base_url=base, api_key=key, max_retries=3, timeout=30)
    started = time.monotonic()
    completion = patient.chat.completions.create(model=model, messages=ask(), max_tokens=4)
    assert completion.choices[0].message.content
    assert time.monotonic() - started >= retry_ms / 1000 * 0.5, "the SDK waited before retrying"
