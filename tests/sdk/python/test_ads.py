"""Ads through the official OpenAI Python SDK: what a free-tier user's program sees.

Run by `tests/tests/it/sdk.rs` with GATEWAY_FREE_KEY (a free key) and GATEWAY_API_KEY
(a premium key); the gateway has one funded campaign on `technology`. The mock provider
answers every request with REPLY.
"""

import os
import urllib.request

import openai
import pytest

REPLY = "The capital of France is Paris."
TECH = "How do I fix this Rust compiler error in my Python and Rust code?"
LABEL = "\n\n---\n[Sponsored] FastIDE: The editor for Rust developers. "


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set; run these tests through `cargo nextest run -p tests -E 'test(/sdk/)'`")
    return value


def client(key_var: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=env("GATEWAY_BASE_URL"), api_key=env(key_var), max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def free() -> openai.OpenAI:
    return client("GATEWAY_FREE_KEY")


@pytest.fixture(scope="module")
def premium() -> openai.OpenAI:
    return client("GATEWAY_API_KEY")


@pytest.fixture(scope="module")
def model() -> str:
    return env("GATEWAY_MODEL")


def ask(text: str = TECH):
    return [{"role": "user", "content": text}]


def stream_text(c: openai.OpenAI, model: str, **kwargs):
    chunks = list(c.chat.completions.create(model=model, stream=True, **kwargs))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return text, chunks


def test_free_stream_ends_with_the_labelled_ad(free, model):
    text, chunks = stream_text(free, model, messages=ask())
    assert text.startswith(REPLY + LABEL), text
    click = text.rsplit(" ", 1)[-1]
    assert "/r/imp_" in click
    # The ad is the last content; the chunk after it finishes the answer.
    with_content = [i for i, ch in enumerate(chunks) if ch.choices and ch.choices[0].delta.content]
    assert "[Sponsored]" in chunks[with_content[-1]].choices[0].delta.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The tracking link redirects to the advertiser.
    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as redirect:
        opener.open(click)
    assert redirect.value.code == 302
    assert redirect.value.headers["Location"] == "https://fastide.example/"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_free_non_stream_answer_carries_the_ad(free, model):
    completion = free.chat.completions.create(model=model, messages=ask())
    assert completion.choices[0].message.content.startswith(REPLY + LABEL)


def test_premium_never_sees_an_ad(premium, model):
    text, _ = stream_text(premium, model, messages=ask())
    assert text == REPLY
    completion = premium.chat.completions.create(model=model, messages=ask())
    assert completion.choices[0].message.content == REPLY


def test_json_mode_tools_and_excluded_topics_never(free, model):
    text, _ = stream_text(free, model, messages=ask(), response_format={"type": "json_object"})
    assert text == REPLY
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    text, _ = stream_text(free, model, messages=ask(), tools=tools)
    assert text == REPLY
    text, _ = stream_text(free, model, messages=ask("Write Rust code to count votes in the election"))
    assert text == REPLY
    text, _ = stream_text(free, model, messages=ask("My code keeps failing and I want to kill myself"))
    assert text == REPLY


def test_metadata_placement_leaves_the_content_untouched(free, model):
    text, chunks = stream_text(free, model, messages=ask(), extra_body={"ad_preferences": {"placement": "metadata"}})
    assert text == REPLY
    ad = chunks[-1].model_extra["ad"]
    assert ad["label"] == "Sponsored"
    assert ad["title"] == "FastIDE"
    assert "/r/imp_" in ad["click_url"]


def test_our_ad_is_not_fed_back_to_the_model(free, model):
    answer = free.chat.completions.create(model=model, messages=ask()).choices[0].message.content
    assert "[Sponsored]" in answer
    follow_up = ask() + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And in Python?"}]
    completion = free.chat.completions.create(model=model, messages=follow_up)
    assert completion.choices[0].message.content.startswith(REPLY)
