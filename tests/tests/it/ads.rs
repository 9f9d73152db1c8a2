//! Contextual ads on the free tier: the auction's money, clicks, where ads never go,
//! placements, stripping, frequency caps, budgets and campaign admin, preferences.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::Row;
use tests::{spawn_mock, MockConfig};

use crate::inproc::*;


pub(crate) const TECH_QUESTION: &str = "How do I fix this Rust compiler error in my Python and Rust code?";

/// An advertiser with `credit` µUSD and one campaign on `technology`; returns
/// `(advertiser id, campaign id)`.
pub(crate) async fn ad_campaign(gw: &Gateway, credit: i64, campaign: Value) -> (String, String) {
    let r = gw.admin_post("/api/admin/advertisers", json!({"name": "Acme <b>Tools</b>"})).await;
    assert_eq!(r.status(), 201);
    let adv: Value = r.json().await.unwrap();
    let adv_id = adv["id"].as_str().unwrap().to_owned();
    let r = gw.admin_post(&format!("/api/admin/advertisers/{adv_id}/credit"), json!({"amountMicros": credit})).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let credited: Value = r.json().await.unwrap();
    let usd = credit as f64 / 1e6;
    assert_eq!(
        credited["balance"],
        json!({"posted": usd, "held": 0.0, "available": usd, "postedMicros": credit, "heldMicros": 0, "availableMicros": credit})
    );
    let list: Value = gw.http.get(gw.url("/api/admin/advertisers")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let listed = list["data"].as_array().unwrap().iter().find(|a| a["id"] == adv_id.as_str()).unwrap();
    assert_eq!(listed["balance"]["availableMicros"], credit);
    assert_eq!(listed["name"], "Acme <b>Tools</b>");
    let mut body = json!({
        "advertiserId": adv_id, "name": "Rust IDE", "categories": ["technology"],
        "title": "FastIDE", "text": "The editor for Rust developers.", "url": "https://fastide.example/?src=gs",
        "cpmBidMicros": 2_000_000, "dailyBudgetMicros": 1_000_000, "totalBudgetMicros": 5_000_000
    });
    for (k, v) in campaign.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = gw.admin_post("/api/admin/campaigns", body).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let c: Value = r.json().await.unwrap();
    (adv_id, c["id"].as_str().unwrap().to_owned())
}

pub(crate) async fn impressions(gw: &Gateway) -> Vec<(String, i64, Option<i64>, Option<String>)> {
    sqlx::query("SELECT id, charged, clicked_at, provider_id FROM ad_impressions ORDER BY created_at")
        .fetch_all(&gw.state.store.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("id"), r.get("charged"), r.get("clicked_at"), r.get("provider_id")))
        .collect()
}

pub(crate) async fn wait_impressions(gw: &Gateway, n: usize) -> Vec<(String, i64, Option<i64>, Option<String>)> {
    for _ in 0..300 {
        let rows = impressions(gw).await;
        if rows.len() >= n {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {n} ad impressions");
}

pub(crate) fn streamed_content(body: &str) -> (String, Vec<Value>) {
    let mut text = String::new();
    let mut chunks = Vec::new();
    for e in sse_events(body) {
        if e == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&e).unwrap();
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        chunks.push(v);
    }
    (text, chunks)
}

#[tokio::test]
async fn inproc_ads_cpm_impression_and_click_move_money_exactly() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (provider, _) = gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let (adv, campaign) = ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;

    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION), "stream": true})).await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"));
    let (text, chunks) = streamed_content(&body);
    assert!(text.starts_with("The capital of France is Paris.\n\n---\n[Sponsored] FastIDE: The editor for Rust developers. "), "{text}");
    // The ad comes before the chunk that finishes the answer.
    let ad_at = chunks.iter().position(|c| c["choices"][0]["delta"]["content"].as_str().is_some_and(|t| t.contains("[Sponsored]"))).unwrap();
    let finish_at = chunks.iter().position(|c| c["choices"][0]["finish_reason"] == "stop").unwrap();
    assert_eq!(ad_at + 1, finish_at);

    let rows = wait_impressions(&gw, 1).await;
    let (imp, charged, clicked, served_by) = rows[0].clone();
    assert!(text.trim_end().ends_with(&format!("/r/{imp}")), "{text}");
    // Alone in the auction: the reserve price, $0.10 CPM = 100 µUSD per impression.
    assert_eq!(charged, 100);
    assert_eq!(clicked, None);
    assert_eq!(served_by.as_deref(), Some(provider.as_str()));
    // 20% to the provider that carried the ad, the rest to the platform.
    assert_eq!(gw.balance(&format!("advertiser:{adv}")).await, 1_000_000 - 100);
    let provider_tokens: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(l.amount), 0) AS BIGINT) FROM ledger_lines l JOIN ledger_entries e ON e.id = l.entry_id WHERE l.account_id = $1 AND e.kind = 'ad_impression'",
    )
    .bind(format!("provider:{provider}"))
    .fetch_one(&gw.state.store.pool)
    .await
    .unwrap();
    assert_eq!(provider_tokens, 20);
    let ad_revenue: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(l.amount), 0) AS BIGINT) FROM ledger_lines l JOIN ledger_entries e ON e.id = l.entry_id WHERE l.account_id = 'platform:ad_revenue' AND e.kind = 'ad_impression'",
    )
    .fetch_one(&gw.state.store.pool)
    .await
    .unwrap();
    assert_eq!(ad_revenue, 80);

    // The click redirects, is recorded once and costs a CPM campaign nothing more.
    let no_redirect = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for _ in 0..2 {
        let r = no_redirect.get(gw.url(&format!("/r/{imp}"))).send().await.unwrap();
        assert_eq!(r.status(), 302);
        assert_eq!(r.headers()["location"], "https://fastide.example/?src=gs");
    }
    let rows = impressions(&gw).await;
    assert!(rows[0].2.is_some());
    assert_eq!(rows[0].1, 100);
    assert_eq!(gw.balance(&format!("advertiser:{adv}")).await, 1_000_000 - 100);
    let r = no_redirect.get(gw.url("/r/imp_unknown")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    let c: Value = gw.http.get(gw.url(&format!("/api/admin/campaigns/{campaign}"))).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(c["stats"]["impressions"], 1);
    assert_eq!(c["stats"]["clicks"], 1);
    assert_eq!(c["stats"]["spendMicros"], 100);
    assert_eq!(c["stats"]["spend"], 0.0001);
    let report: Value = gw.http.get(gw.url("/api/analytics/ads")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(report["impressions"], 1);
    assert_eq!(report["clicks"], 1);
    assert_eq!(report["revenueMicros"], 100);
    assert_eq!(report["revenue"], 0.0001);
    assert_eq!(report["byCategory"][0]["category"], "technology");
    assert_eq!(report["freeTier"]["adRevenueMicros"], 80);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ads_cpc_charges_on_the_first_click_only() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    // CPC only: $0.05 per click at the 1% prior CTR is a $0.50 eCPM; alone, it pays the
    // $0.10 reserve: 100_000 / (1000 × 0.01) = 10_000 µUSD per click.
    let (adv, _) = ad_campaign(&gw, 1_000_000, json!({"cpmBidMicros": 0, "cpcBidMicros": 50_000})).await;
    let free = gw.create_key("free").await;
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION)})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.starts_with("The capital of France is Paris.\n\n---\n[Sponsored] FastIDE"), "{content}");
    let rows = wait_impressions(&gw, 1).await;
    assert_eq!(rows[0].1, 0, "a CPC impression costs nothing until clicked");
    assert_eq!(gw.balance(&format!("advertiser:{adv}")).await, 1_000_000);
    let no_redirect = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for _ in 0..3 {
        let r = no_redirect.get(gw.url(&format!("/r/{}", rows[0].0))).send().await.unwrap();
        assert_eq!(r.status(), 302);
    }
    assert_eq!(gw.balance(&format!("advertiser:{adv}")).await, 1_000_000 - 10_000);
    assert_eq!(impressions(&gw).await[0].1, 10_000);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ads_never_for_premium_structured_tools_or_sensitive_topics() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;
    let premium = gw.create_key("premium").await;
    let reply = "The capital of France is Paris.";
    let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let cases = [
        ("premium", premium.as_str(), json!({})),
        ("json mode", free.as_str(), json!({"response_format": {"type": "json_object"}})),
        ("json schema", free.as_str(), json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})),
        ("tools", free.as_str(), json!({"tools": tool})),
        ("n > 1", free.as_str(), json!({"n": 2})),
        ("politics", free.as_str(), json!({"messages": user("Rust code for the election ballot counting software")})),
        ("self harm", free.as_str(), json!({"messages": user("My Rust code is broken and I want to kill myself")})),
        ("off topic", free.as_str(), json!({"messages": user("Hello there, how are you?")})),
        ("blocked category", free.as_str(), json!({"ad_preferences": {"blocked_categories": ["technology"]}})),
        ("other category wanted", free.as_str(), json!({"ad_preferences": {"categories": ["finance"]}})),
    ];
    for (name, key, extra) in cases {
        for stream in [false, true] {
            let mut body = json!({"model": "mock-model", "messages": user(TECH_QUESTION), "stream": stream});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let r = gw.chat(key, body).await;
            assert_eq!(r.status(), 200, "{name}");
            let text = r.text().await.unwrap();
            assert!(!text.contains("Sponsored"), "{name} (stream {stream}) carried an ad: {text}");
            if stream {
                assert_eq!(streamed_content(&text).0, reply, "{name}");
            }
        }
    }
    // A free key with nothing excluded does get one (the cases above are not vacuous).
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION)})).await;
    assert!(r.text().await.unwrap().contains("[Sponsored] FastIDE"));
    // An unknown placement is the client's error.
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION), "ad_preferences": {"placement": "banner"}})).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "ad_preferences.placement");
    wait_impressions(&gw, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(impressions(&gw).await.len(), 1);
}

#[tokio::test]
async fn inproc_ads_metadata_placement_leaves_content_untouched() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;
    let prefs = json!({"placement": "metadata"});
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION), "stream": true, "ad_preferences": prefs})).await;
    let body = r.text().await.unwrap();
    let (text, chunks) = streamed_content(&body);
    assert_eq!(text, "The capital of France is Paris.");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["ad"]["title"], "FastIDE");
    assert_eq!(last["ad"]["label"], "Sponsored");
    assert_eq!(last["ad"]["category"], "technology");
    assert!(last["ad"]["click_url"].as_str().unwrap().contains("/r/imp_"));
    // Non-streaming: an `ad` object beside `choices`.
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION), "ad_preferences": prefs})).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "The capital of France is Paris.");
    assert_eq!(v["ad"]["title"], "FastIDE");
    wait_impressions(&gw, 2).await;
}

#[tokio::test]
async fn inproc_ads_are_stripped_from_incoming_assistant_turns() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION)})).await;
    let v: Value = r.json().await.unwrap();
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(answer.contains("[Sponsored]"));
    let premium = gw.create_key("premium").await;
    for key in [&free, &premium] {
        let messages = json!([
            {"role": "user", "content": TECH_QUESTION},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And in Python?"},
        ]);
        let r = gw.chat(key, json!({"model": "mock-model", "messages": messages})).await;
        assert_eq!(r.status(), 200);
        let seen = mock.last_body().unwrap();
        assert_eq!(seen["messages"][1]["content"], "The capital of France is Paris.");
        assert!(!seen.to_string().contains("Sponsored"), "{seen}");
    }
}

#[tokio::test]
async fn inproc_ads_no_impression_when_the_client_leaves_or_the_stream_fails() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let (adv, _) = ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;
    // The client reads the first token of a slow stream and hangs up.
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(&format!("{TECH_QUESTION} [slow]")), "stream": true})).await;
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(body);
    // The provider fails after two tokens: an error event, no ad.
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(&format!("{TECH_QUESTION} [fail-mid]")), "stream": true})).await;
    let text = r.text().await.unwrap();
    assert!(text.contains("\"error\""), "{text}");
    assert!(!text.contains("Sponsored"), "{text}");
    // Both requests are settled (usage rows) and neither delivered an ad.
    for _ in 0..300 {
        if gw.usage_rows().await.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gw.usage_rows().await.len(), 2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(impressions(&gw).await.is_empty());
    assert_eq!(gw.balance(&format!("advertiser:{adv}")).await, 1_000_000);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ads_frequency_cap_budget_and_campaign_admin() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let (adv, campaign) = ad_campaign(&gw, 1_000_000, json!({"frequencyCap": 1})).await;
    let free = gw.create_key("free").await;
    let ask = json!({"model": "mock-model", "messages": user(TECH_QUESTION)});
    let first = gw.chat(&free, ask.clone()).await.text().await.unwrap();
    assert!(first.contains("[Sponsored]"));
    wait_impressions(&gw, 1).await;
    let second = gw.chat(&free, ask.clone()).await.text().await.unwrap();
    assert!(!second.contains("[Sponsored]"), "frequency cap of 1 per user per day");
    // Another user is not capped.
    let other = gw.create_key("free").await;
    assert!(gw.chat(&other, ask.clone()).await.text().await.unwrap().contains("[Sponsored]"));
    wait_impressions(&gw, 2).await;

    // Paused: no more ads; validation errors are 400s naming the field.
    let patch = |body: Value| {
        let gw = &gw;
        let campaign = campaign.clone();
        async move { gw.http.patch(gw.url(&format!("/api/admin/campaigns/{campaign}"))).bearer_auth(ADMIN).json(&body).send().await.unwrap() }
    };
    let r = patch(json!({"status": "paused"})).await;
    assert_eq!(r.status(), 200);
    let third = gw.create_key("free").await;
    assert!(!gw.chat(&third, ask.clone()).await.text().await.unwrap().contains("[Sponsored]"));
    for (body, param) in [
        (json!({"categories": ["cars"]}), "categories"),
        (json!({"url": "javascript:alert(1)"}), "url"),
        (json!({"cpmBid": 0, "cpcBid": 0}), "cpmBid"),
        (json!({"startsAt": 2000, "endsAt": 1000}), "endsAt"),
        (json!({"status": "deleted"}), "status"),
        (json!({"title": ""}), "title"),
    ] {
        let r = patch(body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{body}");
    }
    let r = patch(json!({"nope": 1})).await;
    assert_eq!(r.status(), 400);
    // One money convention: USD in the named field, micro-USD in its twin. A micro-USD
    // amount sent in a USD field, the two disagreeing, or more than six decimals are
    // refused naming the field; nothing changes.
    for (body, param) in [
        (json!({"dailyBudget": 1_000_000_000}), "dailyBudget"),
        (json!({"cpmBid": 2_000_000}), "cpmBid"),
        (json!({"totalBudget": 5, "totalBudgetMicros": 4_000_000}), "totalBudget"),
        (json!({"cpcBid": 0.000_000_1}), "cpcBid"),
        (json!({"dailyBudgetMicros": -1}), "dailyBudgetMicros"),
    ] {
        let r = patch(body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
    }
    let r = patch(json!({"dailyBudget": 0.75, "cpmBidMicros": 2_000_000})).await;
    assert_eq!(r.status(), 200);
    let c: Value = r.json().await.unwrap();
    assert_eq!((c["dailyBudget"].clone(), c["dailyBudgetMicros"].clone()), (json!(0.75), json!(750_000)));
    assert_eq!((c["cpmBid"].clone(), c["cpmBidMicros"].clone()), (json!(2.0), json!(2_000_000)));
    let r = gw.admin_post(&format!("/api/admin/advertisers/{adv}/credit"), json!({"amount": 1_000_000_000})).await;
    assert_eq!(r.status(), 400, "a micro-USD credit sent as `amount` is refused, not taken as a billion dollars");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "amount");
    assert!(e["error"]["message"].as_str().unwrap().contains("amountMicros"), "{e}");
    let r = gw.http.patch(gw.url("/api/admin/campaigns/cmp_missing")).bearer_auth(ADMIN).json(&json!({"status": "active"})).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = gw.http.get(gw.url("/api/admin/campaigns")).bearer_auth(&free).send().await.unwrap();
    assert_eq!(r.status(), 401, "the admin API needs the admin key");

    // Active again, with a total budget that one more impression would overrun.
    let r = patch(json!({"status": "active", "frequencyCap": 0, "totalBudgetMicros": 250})).await;
    assert_eq!(r.status(), 200);
    let fourth = gw.create_key("free").await;
    assert!(!gw.chat(&fourth, ask.clone()).await.text().await.unwrap().contains("[Sponsored]"), "200 of 250 spent; an impression may cost up to 2000");
    let list: Value = gw.http.get(gw.url("/api/admin/campaigns")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["data"][0]["stats"]["impressions"], 2);
    assert_eq!(gw.balance(&format!("advertiser:{adv}")).await, 1_000_000 - 200);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ads_preferences_per_key_opt_out_and_completions() {
    let gw = Gateway::start_with(|c| c.ads_free_opt_out = true).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;
    let ask = json!({"model": "mock-model", "messages": user(TECH_QUESTION)});
    assert!(gw.chat(&free, ask.clone()).await.text().await.unwrap().contains("[Sponsored]"));
    // A key's standing preferences: technology blocked.
    let put = |prefs: Value| {
        let (gw, free) = (&gw, free.clone());
        async move { gw.http.put(gw.url("/api/llm/ad-preferences")).bearer_auth(free).json(&prefs).send().await.unwrap() }
    };
    let r = put(json!({"blocked_categories": ["technology"]})).await;
    assert_eq!(r.status(), 200);
    assert!(!gw.chat(&free, ask.clone()).await.text().await.unwrap().contains("[Sponsored]"));
    let r = put(json!({"blocked_categories": ["cars"]})).await;
    assert_eq!(r.status(), 400);
    let r = put(json!({})).await;
    assert_eq!(r.status(), 200);
    assert!(gw.chat(&free, ask.clone()).await.text().await.unwrap().contains("[Sponsored]"));
    // Opt-out is honoured where the gateway allows it for the free tier.
    let mut opt_out = ask.clone();
    opt_out["ad_preferences"] = json!({"opt_out": true});
    assert!(!gw.chat(&free, opt_out).await.text().await.unwrap().contains("[Sponsored]"));
    // The completions endpoint carries the ad in `text`.
    let r = gw
        .http
        .post(gw.url("/v1/completions"))
        .bearer_auth(&free)
        .json(&json!({"model": "mock-model", "prompt": TECH_QUESTION, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text: String = sse_events(&r.text().await.unwrap())
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_owned))
        .collect();
    assert!(text.starts_with("The capital of France is Paris.\n\n---\n[Sponsored] FastIDE"), "{text}");
    wait_impressions(&gw, 3).await;
}

#[tokio::test]
async fn inproc_ads_opt_out_is_refused_on_the_free_tier_by_default_and_prompt_placement() {
    let gw = Gateway::start_with(|c| c.ads_prompt_placement = true).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION), "ad_preferences": {"opt_out": true}})).await;
    assert!(r.text().await.unwrap().contains("[Sponsored]"), "free keys cannot opt out unless ads_free_opt_out");
    // The prompt placement: a labelled note in the system prompt, nothing in the answer.
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION), "ad_preferences": {"placement": "prompt"}})).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "The capital of France is Paris.");
    let seen = mock.last_body().unwrap();
    assert_eq!(seen["messages"][0]["role"], "system");
    let note = seen["messages"][0]["content"].as_str().unwrap();
    assert!(note.starts_with("Sponsored note") && note.contains("FastIDE"), "{note}");
    wait_impressions(&gw, 2).await;
    // Where the gateway does not allow it, asking for it is a 400.
    let gw2 = Gateway::start().await;
    gw2.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let free2 = gw2.create_key("free").await;
    let r = gw2.chat(&free2, json!({"model": "mock-model", "messages": user(TECH_QUESTION), "ad_preferences": {"placement": "prompt"}})).await;
    assert_eq!(r.status(), 400);
}
