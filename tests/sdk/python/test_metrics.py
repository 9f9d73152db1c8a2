"""`GET /metrics` read with Prometheus's own text-format parser, before and after real
traffic through the OpenAI SDK: every family is well-formed and the counters move.

Run by `tests/tests/it/sdk.rs` with the other Python SDK tests (same gateway, same mock).
"""

import os
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set; run these tests through `cargo nextest run -p tests -E 'test(/sdk/)'`")
    return value


def scrape() -> dict:
    """Family name → parsed family (the parser drops a counter's `_total` from the name)."""
    base = env("GATEWAY_BASE_URL").removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict, family: str, sample: str, **labels) -> float:
    """One sample's value; 0 when the labelled series does not exist yet."""
    matches = [
        s.value
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) <= 1, f"{sample}{labels} is ambiguous: {matches}"
    return matches[0] if matches else 0.0


EXPECTED = {
    "gs_http_requests": "counter",
    "gs_http_request_duration_seconds": "histogram",
    "gs_time_to_first_token_seconds": "histogram",
    "gs_completions": "counter",
    "gs_tokens": "counter",
    "gs_ledger_charged_usd": "counter",
    "gs_active_streams": "gauge",
    "gs_queued_requests": "gauge",
    "gs_providers_online": "gauge",
    "gs_provider_score": "gauge",
    "gs_provider_breaker_open": "gauge",
    "gs_provider_in_flight": "gauge",
    "gs_ad_auctions": "counter",
    "gs_ad_no_fill": "counter",
    "gs_ad_impressions": "counter",
    "gs_ad_clicks": "counter",
    "gs_ad_charged_usd": "counter",
}


def check_histogram(family) -> None:
    """Buckets are cumulative and `+Inf` equals `_count`."""
    buckets = [(s.labels["le"], s.value) for s in family.samples if s.name.endswith("_bucket")]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), f"{family.name} buckets are not cumulative: {buckets}"
    assert buckets[-1][0] == "+Inf"
    count = [s.value for s in family.samples if s.name.endswith("_count")]
    assert count == [buckets[-1][1]], f"{family.name}: +Inf bucket {buckets[-1][1]} != count {count}"


def test_metrics_move_with_traffic():
    client = openai.OpenAI(base_url=env("GATEWAY_BASE_URL"), api_key=env("GATEWAY_API_KEY"), max_retries=0, timeout=30)
    model = env("GATEWAY_MODEL")
    before = scrape()
    for name, kind in EXPECTED.items():
        assert name in before, f"/metrics has no {name} family; it has {sorted(before)}"
        assert before[name].type == kind, f"{name} is a {before[name].type}, expected {kind}"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=model, messages=messages)
    assert reply.choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=model, messages=messages, stream=True)
        if c.choices
    )
    assert streamed == reply.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=messages)

    after = scrape()
    path = "/v1/chat/completions"
    http = "gs_http_requests"
    assert value(after, http, f"{http}_total", path=path, status="200") - value(before, http, f"{http}_total", path=path, status="200") == 2
    assert value(after, http, f"{http}_total", path=path, status="404") - value(before, http, f"{http}_total", path=path, status="404") == 1
    assert value(after, "gs_completions", "gs_completions_total", status="ok") - value(
        before, "gs_completions", "gs_completions_total", status="ok"
    ) == 2
    completion_tokens = value(after, "gs_tokens", "gs_tokens_total", kind="completion") - value(
        before, "gs_tokens", "gs_tokens_total", kind="completion"
    )
    assert completion_tokens == reply.usage.completion_tokens * 2
    assert value(after, "gs_tokens", "gs_tokens_total", kind="prompt") > value(before, "gs_tokens", "gs_tokens_total", kind="prompt")
    assert value(after, "gs_ledger_charged_usd", "gs_ledger_charged_usd_total") > value(
        before, "gs_ledger_charged_usd", "gs_ledger_charged_usd_total"
    ), "a premium key's requests are charged"

    ttft = "gs_time_to_first_token_seconds"
    assert value(after, ttft, f"{ttft}_count") - value(before, ttft, f"{ttft}_count") == 2
    assert value(after, ttft, f"{ttft}_sum") > value(before, ttft, f"{ttft}_sum")
    latency = "gs_http_request_duration_seconds"
    # The scrape itself is recorded after it answers, so at least the three completions.
    assert value(after, latency, f"{latency}_count") - value(before, latency, f"{latency}_count") >= 3
    for name in (ttft, latency):
        check_histogram(after[name])

    # The SDK suite's key is premium: no auction, no ad.
    for family in ("gs_ad_auctions", "gs_ad_impressions"):
        assert value(after, family, f"{family}_total") == value(before, family, f"{family}_total"), family
    assert value(after, "gs_active_streams", "gs_active_streams") == 0
    assert value(after, "gs_providers_online", "gs_providers_online") == 1
    scores = [s for s in after["gs_provider_score"].samples]
    assert len(scores) == 1 and "provider" in scores[0].labels
    assert 0 < scores[0].value <= 1
    assert [s.value for s in after["gs_provider_breaker_open"].samples] == [0]
    assert [s.value for s in after["gs_provider_in_flight"].samples] == [0]
