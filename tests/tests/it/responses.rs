//! The Responses API (`/v1/responses`) in process, on SQLite or PostgreSQL
//! (`GS_TEST_DB`): translation to chat, typed stream events, stored conversations,
//! tools, ads, billing and every refusal. The SDK suites in `tests/sdk/` call it too.

use serde_json::{json, Value};
use tests::{spawn_mock, MockConfig, MockProvider, REPLY};

use crate::ads::{ad_campaign, wait_impressions, TECH_QUESTION};
use crate::inproc::Gateway;

const MODEL: &str = "mock-model";

async fn setup() -> (Gateway, MockProvider) {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, MODEL, None, &["standard"]).await;
    (gw, mock)
}

/// A premium key with $10 of credit, and its user id.
async fn premium(gw: &Gateway) -> (String, String) {
    let (key, user) = gw.create_unfunded_key("premium").await;
    gw.credit(&user, 10_000_000).await;
    (key, user)
}

async fn create(gw: &Gateway, key: &str, body: Value) -> reqwest::Response {
    gw.http.post(gw.url("/v1/responses")).bearer_auth(key).json(&body).send().await.unwrap()
}

async fn ok(gw: &Gateway, key: &str, body: Value) -> Value {
    let r = create(gw, key, body).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// `(event name, data)` of each SSE event.
async fn sse_events(r: reqwest::Response) -> Vec<(String, Value)> {
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let body = r.text().await.unwrap();
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or_default().to_owned();
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            (name, serde_json::from_str(data).unwrap())
        })
        .collect()
}

fn request_id(response_id: &str) -> String {
    format!("req_{}", response_id.strip_prefix("resp_").unwrap())
}

/// What the ledger charged the user for one request, in micro-USD.
async fn charged(gw: &Gateway, user: &str, request: &str) -> i64 {
    let lines: Option<i64> = sqlx::query_scalar(
        "SELECT CAST(SUM(l.amount) AS BIGINT) FROM ledger_lines l JOIN ledger_entries e ON l.entry_id = e.id \
         WHERE e.request_id = $1 AND l.account_id = $2",
    )
    .bind(request)
    .bind(format!("user:{user}"))
    .fetch_one(&gw.state.store.pool)
    .await
    .unwrap();
    -lines.unwrap_or(0)
}

/// The usage row of one request: endpoint, prompt and completion tokens, cost.
async fn usage_row(gw: &Gateway, request: &str) -> (String, i64, i64, i64) {
    for _ in 0..200 {
        let row: Option<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT endpoint, prompt_tokens, completion_tokens, cost_micros FROM usage_records WHERE request_id = $1",
        )
        .bind(request)
        .fetch_optional(&gw.state.store.pool)
        .await
        .unwrap();
        if let Some(row) = row {
            return row;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no usage record for {request}");
}

#[tokio::test]
async fn inproc_responses_answer_is_billed_stored_retrieved_and_deleted() {
    let (gw, mock) = setup().await;
    let (key, user) = premium(&gw).await;
    let v = ok(&gw, &key, json!({"model": MODEL, "input": "What is the capital of France?", "metadata": {"topic": "geo"}})).await;
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["metadata"], json!({"topic": "geo"}));
    let reply = REPLY.concat();
    assert_eq!(v["output_text"], reply.as_str());
    let output = v["output"].as_array().unwrap();
    assert_eq!(output.len(), 1);
    assert_eq!(output[0]["type"], "message");
    assert_eq!(output[0]["role"], "assistant");
    assert_eq!(output[0]["content"][0], json!({"type": "output_text", "text": reply, "annotations": []}));
    // The provider got a chat completion with our resolved parameters.
    let sent = mock.last_body().unwrap();
    assert_eq!(sent["messages"], json!([{"role": "user", "content": "What is the capital of France?"}]));
    assert_eq!(sent["stream"], true);

    // Usage and cost are the ledger's.
    let id = v["id"].as_str().unwrap();
    let request = request_id(id);
    let (endpoint, prompt, completion, cost) = usage_row(&gw, &request).await;
    assert_eq!(endpoint, "responses");
    assert_eq!(v["usage"]["input_tokens"], prompt);
    assert_eq!(v["usage"]["output_tokens"], completion);
    assert_eq!(v["usage"]["total_tokens"], prompt + completion);
    assert_eq!(completion, 6);
    assert!(cost > 0);
    assert_eq!(charged(&gw, &user, &request).await, cost);
    assert!((v["usage"]["cost"].as_f64().unwrap() - cost as f64 / 1e6).abs() < 1e-9);

    // Stored: the same object comes back, for this user only.
    let got: Value = gw.http.get(gw.url(&format!("/v1/responses/{id}"))).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert_eq!(got, v);
    let (other, _) = premium(&gw).await;
    for r in [
        gw.http.get(gw.url(&format!("/v1/responses/{id}"))).bearer_auth(&other).send().await.unwrap(),
        gw.http.delete(gw.url(&format!("/v1/responses/{id}"))).bearer_auth(&other).send().await.unwrap(),
    ] {
        assert_eq!(r.status(), 404);
        let e: Value = r.json().await.unwrap();
        assert!(e["error"]["message"].as_str().unwrap().contains(id));
    }
    let r = gw.http.delete(gw.url(&format!("/v1/responses/{id}"))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"id": id, "object": "response", "deleted": true}));
    let r = gw.http.get(gw.url(&format!("/v1/responses/{id}"))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // `store: false` keeps nothing.
    let v = ok(&gw, &key, json!({"model": MODEL, "input": "Hi", "store": false})).await;
    assert_eq!(v["store"], false);
    let r = gw.http.get(gw.url(&format!("/v1/responses/{}", v["id"].as_str().unwrap()))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 404);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_responses_stream_sends_typed_events_in_order() {
    let (gw, _mock) = setup().await;
    let (key, user) = premium(&gw).await;
    let r = create(&gw, &key, json!({"model": MODEL, "input": "What is the capital of France?", "stream": true})).await;
    let events = sse_events(r).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected = vec!["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"];
    expected.extend(std::iter::repeat_n("response.output_text.delta", REPLY.len()));
    expected.extend(["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]);
    assert_eq!(names, expected);
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_str());
        assert_eq!(data["sequence_number"], i);
    }
    let deltas: String = events.iter().filter(|(n, _)| n == "response.output_text.delta").map(|(_, d)| d["delta"].as_str().unwrap()).collect();
    assert_eq!(deltas, REPLY.concat());
    assert_eq!(events[0].1["response"]["status"], "in_progress");
    let done = &events.last().unwrap().1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output_text"], REPLY.concat());
    let request = request_id(done["id"].as_str().unwrap());
    let (endpoint, prompt, completion, cost) = usage_row(&gw, &request).await;
    assert_eq!(endpoint, "responses");
    assert_eq!(done["usage"]["input_tokens"], prompt);
    assert_eq!(done["usage"]["output_tokens"], completion);
    assert_eq!(charged(&gw, &user, &request).await, cost);
    // The streamed response is stored as it ended.
    let got: Value = gw.http.get(gw.url(&format!("/v1/responses/{}", done["id"].as_str().unwrap()))).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert_eq!(&got, done);

    // At the token limit the response is incomplete.
    let r = create(&gw, &key, json!({"model": MODEL, "input": "Hi", "stream": true, "max_output_tokens": 2})).await;
    let events = sse_events(r).await;
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "response.incomplete");
    assert_eq!(last["response"]["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(last["response"]["output_text"], "The capital");
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_responses_failure_mid_stream_ends_with_response_failed_and_bills_what_was_delivered() {
    let (gw, _mock) = setup().await;
    let (key, user) = premium(&gw).await;
    let r = create(&gw, &key, json!({"model": MODEL, "input": "[fail-mid] hello", "stream": true})).await;
    let events = sse_events(r).await;
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "response.failed");
    assert_eq!(last["response"]["status"], "failed");
    assert_eq!(last["response"]["error"]["code"], "server_error");
    assert!(events.iter().all(|(n, _)| n != "response.completed"));
    let request = request_id(last["response"]["id"].as_str().unwrap());
    let (_, _, completion, cost) = usage_row(&gw, &request).await;
    assert_eq!(completion, 2, "the two delivered tokens are billed");
    assert_eq!(charged(&gw, &user, &request).await, cost);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_responses_previous_response_id_replays_the_conversation() {
    let (gw, mock) = setup().await;
    let (key, _) = premium(&gw).await;
    let first = ok(&gw, &key, json!({"model": MODEL, "instructions": "Be brief.", "input": "What is the capital of France?"})).await;
    assert_eq!(mock.last_body().unwrap()["messages"][0], json!({"role": "system", "content": "Be brief."}));
    let second = ok(
        &gw,
        &key,
        json!({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_text", "text": "And of Germany?"}]}], "previous_response_id": first["id"]}),
    )
    .await;
    assert_eq!(second["previous_response_id"], first["id"]);
    // The earlier input and answer come first; earlier instructions are not carried over.
    let sent = mock.last_body().unwrap();
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": REPLY.concat()},
            {"role": "user", "content": "And of Germany?"},
        ])
    );
    let input = |v: &Value| v["usage"]["input_tokens"].as_i64().unwrap();
    assert!(input(&second) > input(&first) + 6, "the replayed exchange is billed as input: {} vs {}", input(&second), input(&first));
    // A chain of three.
    ok(&gw, &key, json!({"model": MODEL, "input": "Thanks", "previous_response_id": second["id"]})).await;
    assert_eq!(mock.last_body().unwrap()["messages"].as_array().unwrap().len(), 5);

    // Unknown, foreign and deleted ids are 404s naming the parameter; nothing is billed.
    let (other, _) = premium(&gw).await;
    let deleted = ok(&gw, &key, json!({"model": MODEL, "input": "x"})).await;
    let r = gw.http.delete(gw.url(&format!("/v1/responses/{}", deleted["id"].as_str().unwrap()))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let rows = gw.usage_rows().await.len();
    for (who, id) in [(&key, "resp_doesnotexist"), (&other, first["id"].as_str().unwrap()), (&key, deleted["id"].as_str().unwrap())] {
        let r = create(&gw, who, json!({"model": MODEL, "input": "x", "previous_response_id": id})).await;
        assert_eq!(r.status(), 404);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], "previous_response_id");
        assert!(e["error"]["message"].as_str().unwrap().contains(id));
    }
    assert_eq!(gw.usage_rows().await.len(), rows);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_responses_function_tool_round_trip() {
    let (gw, mock) = setup().await;
    let (key, _) = premium(&gw).await;
    let tools = json!([{"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
    let first = ok(&gw, &key, json!({"model": MODEL, "input": "[tool] What is the weather in Paris?", "tools": tools, "tool_choice": "auto"})).await;
    let sent = mock.last_body().unwrap();
    assert_eq!(sent["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(sent["tools"][0]["function"]["parameters"]["required"], json!(["city"]));
    assert_eq!(sent["tool_choice"], "auto");
    let output = first["output"].as_array().unwrap();
    assert_eq!(output.len(), 1, "{output:?}");
    let call = &output[0];
    assert_eq!(call["type"], "function_call");
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["call_id"], "call_mock_1");
    assert_eq!(call["arguments"], "{\"city\": \"Paris\"}");
    assert_eq!(first["output_text"], "");

    // The result goes back as a function_call_output item.
    let second = ok(
        &gw,
        &key,
        json!({"model": MODEL, "previous_response_id": first["id"], "tools": tools,
               "input": [{"type": "function_call_output", "call_id": "call_mock_1", "output": "{\"sky\": \"sunny\"}"}]}),
    )
    .await;
    let sent = mock.last_body().unwrap();
    let messages = sent["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["tool_calls"][0]["id"], "call_mock_1");
    assert_eq!(messages[1]["tool_calls"][0]["function"]["arguments"], "{\"city\": \"Paris\"}");
    assert_eq!(messages[2], json!({"role": "tool", "tool_call_id": "call_mock_1", "content": "{\"sky\": \"sunny\"}"}));
    assert_eq!(second["output_text"], REPLY.concat());

    // Streamed, the call's arguments arrive as deltas.
    let r = create(&gw, &key, json!({"model": MODEL, "input": "[tool] weather?", "tools": tools, "stream": true})).await;
    let events = sse_events(r).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created", "response.in_progress", "response.output_item.added",
            "response.function_call_arguments.delta", "response.function_call_arguments.delta",
            "response.function_call_arguments.done", "response.output_item.done", "response.completed",
        ]
    );
    assert_eq!(events[5].1["arguments"], "{\"city\": \"Paris\"}");
    assert_eq!(events[6].1["item"]["status"], "completed");

    // The same items when the client sends the whole conversation back itself.
    let input = json!([
        {"role": "user", "content": "[tool] weather?"},
        {"type": "function_call", "call_id": "call_mock_1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_mock_1", "output": "sunny"},
    ]);
    let v = ok(&gw, &key, json!({"model": MODEL, "input": input, "tools": tools})).await;
    assert_eq!(v["output_text"], REPLY.concat());
    assert_eq!(mock.last_body().unwrap()["messages"][1]["tool_calls"][0]["function"]["name"], "get_weather");
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_responses_refusals_name_the_param_and_bill_nothing() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    // A provider that honours only `stop`: tools and JSON formats have no provider.
    gw.add_provider(&mock, MODEL, Some(vec!["stop"]), &["standard"]).await;
    let (key, _) = premium(&gw).await;
    let metadata: serde_json::Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let cases = [
        (json!({"input": 42}), 400, "input"),
        (json!({"input": []}), 400, "input"),
        (json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}), 400, "input[0].content[0].type"),
        (json!({"input": [{"role": "user", "content": "a"}, {"type": "input_file", "file_id": "f"}]}), 400, "input[1].type"),
        (json!({"input": [{"type": "item_reference", "id": "msg_1"}]}), 400, "input[0].type"),
        (json!({"input": [{"role": "robot", "content": "a"}]}), 400, "input[0].role"),
        (json!({"input": [{"type": "function_call_output", "output": "x"}]}), 400, "input[0].call_id"),
        (json!({"input": "x", "tools": [{"type": "web_search"}]}), 400, "tools[0].type"),
        (json!({"input": "x", "tools": [{"type": "function"}]}), 400, "tools[0].name"),
        (json!({"input": "x", "tools": [{"type": "function", "name": "f"}]}), 400, "tools"),
        (json!({"input": "x", "tool_choice": "sometimes"}), 400, "tool_choice"),
        (json!({"input": "x", "tool_choice": "required"}), 400, "tool_choice"),
        (json!({"input": "x", "text": {"format": {"type": "json_object"}}}), 400, "text.format"),
        (json!({"input": "x", "text": {"format": {"type": "yaml"}}}), 400, "text.format.type"),
        (json!({"input": "x", "max_output_tokens": 0}), 400, "max_output_tokens"),
        (json!({"input": "x", "temperature": 3}), 400, "temperature"),
        (json!({"input": "x", "background": true}), 400, "background"),
        (json!({"input": "x", "truncation": "auto"}), 400, "truncation"),
        (json!({"input": "x", "include": ["reasoning.encrypted_content"]}), 400, "include"),
        (json!({"input": "x", "metadata": metadata}), 400, "metadata"),
        (json!({"input": "x", "model": ""}), 400, "model"),
        (json!({"input": "x", "model": "no-such-model"}), 404, "model"),
        (json!({"input": "x", "previous_response_id": "resp_unknown"}), 404, "previous_response_id"),
    ];
    for (body, status, param) in cases {
        let mut request = json!({"model": MODEL});
        for (k, v) in body.as_object().unwrap() {
            request[k] = v.clone();
        }
        let r = create(&gw, &key, request.clone()).await;
        assert_eq!(r.status(), status, "{request}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{request}: {e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Not JSON, and no key.
    let r = gw.http.post(gw.url("/v1/responses")).bearer_auth(&key).header("content-type", "text/plain").body("hi").send().await.unwrap();
    assert_eq!(r.status(), 415);
    let r = gw.http.post(gw.url("/v1/responses")).json(&json!({"model": MODEL, "input": "x"})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(mock.request_count(), 0);
    assert!(gw.usage_rows().await.is_empty(), "refused requests leave no usage record");
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_responses_free_key_ends_with_a_labelled_ad_item_never_with_tools_or_json() {
    let (gw, mock) = setup().await;
    ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;
    let v = ok(&gw, &free, json!({"model": MODEL, "input": TECH_QUESTION})).await;
    let output = v["output"].as_array().unwrap();
    assert_eq!(output.len(), 2, "{output:?}");
    assert_eq!(output[0]["content"][0]["text"], REPLY.concat());
    let ad = &output[1];
    assert!(ad["id"].as_str().unwrap().starts_with("msg_ad_"));
    let ad_text = ad["content"][0]["text"].as_str().unwrap();
    assert!(ad_text.contains("[Sponsored] FastIDE"), "{ad_text}");
    assert!(v["output_text"].as_str().unwrap().ends_with(ad_text));
    wait_impressions(&gw, 1).await;

    // Streamed: the ad item comes after the answer, before `response.completed`.
    let r = create(&gw, &free, json!({"model": MODEL, "input": TECH_QUESTION, "stream": true})).await;
    let events = sse_events(r).await;
    let added: Vec<&Value> = events.iter().filter(|(n, _)| n == "response.output_item.added").map(|(_, d)| d).collect();
    assert_eq!(added.len(), 2);
    assert!(added[1]["item"]["id"].as_str().unwrap().starts_with("msg_ad_"));
    assert_eq!(events.last().unwrap().0, "response.completed");
    wait_impressions(&gw, 2).await;

    // Replayed, neither the ad item nor a pasted ad block reaches the model.
    ok(&gw, &free, json!({"model": MODEL, "input": "Go on", "previous_response_id": v["id"]})).await;
    let pasted = json!([
        {"role": "user", "content": TECH_QUESTION},
        {"role": "assistant", "content": format!("{}\n\n{ad_text}", REPLY.concat())},
        {"type": "message", "id": ad["id"], "role": "assistant", "content": [{"type": "output_text", "text": ad_text}]},
        {"role": "user", "content": "Go on"},
    ]);
    ok(&gw, &free, json!({"model": MODEL, "input": pasted})).await;
    for body in mock.bodies.lock().iter() {
        assert!(!body.to_string().contains("Sponsored"), "{body}");
    }
    let sent = mock.last_body().unwrap();
    assert_eq!(sent["messages"][1], json!({"role": "assistant", "content": REPLY.concat()}));
    assert_eq!(sent["messages"].as_array().unwrap().len(), 3);

    // Never with tools or a JSON format.
    let tools = json!([{"type": "function", "name": "f", "parameters": {"type": "object"}}]);
    for extra in [json!({"tools": tools}), json!({"text": {"format": {"type": "json_object"}}})] {
        let mut body = json!({"model": MODEL, "input": TECH_QUESTION});
        for (k, val) in extra.as_object().unwrap() {
            body[k] = val.clone();
        }
        let v = ok(&gw, &free, body).await;
        assert!(v["output"].as_array().unwrap().iter().all(|i| !i["id"].as_str().unwrap().starts_with("msg_ad_")), "{v}");
        assert!(!v.to_string().contains("Sponsored"));
    }
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_responses_past_retention_are_not_served_and_are_swept() {
    let gw = Gateway::start_with(|c| c.responses_retention_days = 1).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, MODEL, None, &["standard"]).await;
    let (key, _) = premium(&gw).await;
    let old = ok(&gw, &key, json!({"model": MODEL, "input": "Hi"})).await;
    let fresh = ok(&gw, &key, json!({"model": MODEL, "input": "Hi"})).await;
    let two_days_ago = gateway::store::now_ms() - 2 * 86_400_000;
    sqlx::query("UPDATE responses SET created_at = $1 WHERE id = $2")
        .bind(two_days_ago)
        .bind(old["id"].as_str().unwrap())
        .execute(&gw.state.store.pool)
        .await
        .unwrap();
    let r = gw.http.get(gw.url(&format!("/v1/responses/{}", old["id"].as_str().unwrap()))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = create(&gw, &key, json!({"model": MODEL, "input": "x", "previous_response_id": old["id"]})).await;
    assert_eq!(r.status(), 404);
    assert_eq!(gateway::api::responses::sweep(&gw.state).await.unwrap(), 1);
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM responses").fetch_one(&gw.state.store.pool).await.unwrap();
    assert_eq!(left, 1, "only the old one is gone");
    let r = gw.http.get(gw.url(&format!("/v1/responses/{}", fresh["id"].as_str().unwrap()))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
