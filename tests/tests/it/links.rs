//! Dial-out providers (issue #21) with a test-double worker: the counted mock's router
//! served over a real link (`link::run`, the worker's own code) to the in-process
//! gateway. Streaming, billing, cancellation, 1,000 streams on one link, replacement,
//! revocation, refusals, a CONNECT proxy and a middlebox that cuts idle connections.
//! The real worker in a network namespace is `nat.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value};
use tests::{mock_app, MockConfig, MockProvider};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::inproc::{Gateway, ADMIN};

/// Registers a dial-out provider (no `baseUrl`) for `mock-model` and puts it on line.
pub(crate) async fn register_dial_out(gw: &Gateway, capacity: u32) -> (String, String) {
    let r = gw
        .admin_post(
            "/api/gpu/register",
            json!({"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": capacity},
                   "pricing": {"perToken": 0.000002}, "connection": "dialOut"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let (id, key) = (v["providerId"].as_str().unwrap().to_owned(), v["providerKey"].as_str().unwrap().to_owned());
    let r = gw
        .http
        .post(gw.url("/api/gpu/stream/start"))
        .bearer_auth(&key)
        .json(&json!({"providerId": id, "model": "mock-model", "quality": "standard"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    (id, key)
}

fn dial_to(gateway: &str, id: &str, key: &str) -> link::Dial {
    link::Dial { gateway: gateway.to_owned(), provider_id: id.to_owned(), provider_key: key.to_owned(), proxy: None, extra_roots: Vec::new() }
}

/// A test-double worker: `app` served over links kept open by `link::run`.
pub(crate) struct Worker {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    pub(crate) fn start(dial: link::Dial, app: Router) -> Self {
        let (stop, stopping) = watch::channel(false);
        let service = hyper_util::service::TowerToHyperService::new(app);
        Self { stop, task: tokio::spawn(link::run(dial, service, stopping)) }
    }

    /// Drains its link (open streams finish) and returns when it is closed.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The id of the provider's open link on this gateway, once it has one (10 s at most).
pub(crate) async fn wait_link(gw: &Gateway, id: &str, other_than: Option<u64>) -> u64 {
    for _ in 0..200 {
        if let Some(link) = gw.state.registry.get(id).and_then(|p| p.load.link()) {
            if Some(link.id) != other_than {
                return link.id;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("provider {id} has no (new) link");
}

async fn link_closed(gw: &Gateway, id: &str) -> bool {
    for _ in 0..200 {
        if gw.state.registry.get(id).is_some_and(|p| p.load.link().is_none()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The usage rows once the request-end writer has recorded any (5 s at most).
async fn recorded_usage(gw: &Gateway) -> Vec<(String, String, i64, i64)> {
    for _ in 0..100 {
        let rows = gw.usage_rows().await;
        if !rows.is_empty() {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Vec::new()
}

/// A mock worker on line over a link.
async fn linked_mock(gw: &Gateway, config: MockConfig) -> (MockProvider, String, String, Worker) {
    let (id, key) = register_dial_out(gw, 1024).await;
    let (mock, app) = mock_app(([0, 0, 0, 0], 0).into(), config);
    let worker = Worker::start(dial_to(&gw.base, &id, &key), app);
    wait_link(gw, &id, None).await;
    (mock, id, key, worker)
}

fn stream_body(text: &str) -> Value {
    json!({"model": "mock-model", "stream": true, "messages": [{"role": "user", "content": text}]})
}

/// The SSE text of a whole response.
async fn read_all(r: reqwest::Response) -> String {
    let mut text = String::new();
    let mut body = r.bytes_stream();
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

#[tokio::test]
async fn inproc_a_linked_provider_streams_bills_and_shows_in_admin() {
    let gw = Gateway::start().await;
    let (mock, id, _, worker) = linked_mock(&gw, MockConfig::default()).await;
    let key = gw.create_key("premium").await;
    let r = gw.chat(&key, stream_body("What is the capital of France?")).await;
    assert_eq!(r.status(), 200);
    let text = read_all(r).await;
    assert!(text.contains("Paris") && text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(mock.request_count(), 1);
    let rows = gw.usage_rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].0.as_str(), rows[0].1.as_str(), rows[0].3), ("ok", id.as_str(), 6));
    gw.ledger_is_clean().await;

    let v: Value = gw.http.get(gw.url("/api/admin/providers")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let p = &v["data"][0];
    assert_eq!((p["connection"].as_str(), p["baseUrl"].is_null(), p["online"].as_bool()), (Some("dialOut"), true, Some(true)), "{p}");

    // Its link closed, it is off line here: nothing can reach it.
    worker.stop().await;
    assert!(link_closed(&gw, &id).await);
    let r = gw.chat(&key, stream_body("again")).await;
    assert_eq!(r.status(), 404, "no live provider serves the model");
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn inproc_registration_checks_the_connection_mode() {
    let gw = Gateway::start().await;
    let caps = json!({"models": ["m"], "maxConcurrentStreams": 4});
    let cases = [
        (json!({"capabilities": caps, "pricing": {"perToken": 0.0}, "connection": "dialOut", "baseUrl": "http://127.0.0.1:9"}), "baseUrl"),
        (json!({"capabilities": caps, "pricing": {"perToken": 0.0}}), "baseUrl"),
        (json!({"capabilities": caps, "pricing": {"perToken": 0.0}, "connection": "carrier-pigeon"}), "connection"),
    ];
    for (body, param) in cases {
        let r = gw.admin_post("/api/gpu/register", body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["param"].as_str().unwrap_or_default().contains(param), "{body}: {v}");
    }
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM providers").fetch_one(&gw.state.store.pool).await.unwrap();
    assert_eq!(n, 0);
}

/// 1,000 streams open at once over one link, each cancelled on the worker when its
/// client goes away.
#[tokio::test]
async fn a_link_carries_1000_streams_and_cancels_each() {
    let _ = rlimit::increase_nofile_limit(8192);
    let gw = Gateway::start_with(|c| {
        c.max_connections_per_ip = 4096;
        c.premium_requests_per_minute = 100_000;
        c.premium_tokens_per_minute = 100_000_000;
        c.first_token_timeout_secs = 30;
        c.idle_chunk_timeout_secs = 120;
    })
    .await;
    let (mock, id, _, worker) = linked_mock(&gw, MockConfig::default()).await;
    let link_id = wait_link(&gw, &id, None).await;
    let key = gw.create_key("premium").await;
    const STREAMS: usize = 1000;
    let first_tokens = Arc::new(AtomicUsize::new(0));
    let (release, released) = watch::channel(false);
    let mut clients = Vec::new();
    for _ in 0..STREAMS {
        let (http, url, key, first_tokens, mut released) =
            (gw.http.clone(), gw.url("/v1/chat/completions"), key.clone(), first_tokens.clone(), released.clone());
        clients.push(tokio::spawn(async move {
            let r = http.post(url).bearer_auth(key).json(&stream_body("[idle] hold on")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let mut body = r.bytes_stream();
            let mut text = String::new();
            while !text.contains("The") {
                text.push_str(&String::from_utf8_lossy(&body.next().await.unwrap().unwrap()));
            }
            first_tokens.fetch_add(1, Ordering::SeqCst);
            let _ = released.wait_for(|r| *r).await;
            // The client goes away here, its stream unread.
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while mock.open_streams.load(Ordering::SeqCst) < STREAMS || first_tokens.load(Ordering::SeqCst) < STREAMS {
        assert!(Instant::now() < deadline, "open on the worker: {}, first tokens: {}", mock.open_streams.load(Ordering::SeqCst), first_tokens.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(wait_link(&gw, &id, None).await, link_id, "all on one link");
    let _ = release.send(true);
    for c in clients {
        c.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while mock.cancelled.load(Ordering::SeqCst) < STREAMS {
        assert!(Instant::now() < deadline, "cancelled on the worker: {}", mock.cancelled.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(mock.open_streams.load(Ordering::SeqCst), 0);
    worker.stop().await;
}

/// A rotated provider key closes the link at once: the open stream ends with an error
/// event, billed for what was delivered; the old key cannot open a new link.
#[tokio::test]
async fn inproc_a_rotated_key_closes_the_link_mid_stream() {
    let gw = Gateway::start().await;
    let (mock, id, key, worker) = linked_mock(&gw, MockConfig::default()).await;
    let user_key = gw.create_key("premium").await;
    let r = gw.chat(&user_key, stream_body("[idle] hold on")).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::new();
    while !text.contains("The") {
        text.push_str(&String::from_utf8_lossy(&body.next().await.unwrap().unwrap()));
    }
    let rotated = gw.http.post(gw.url("/api/gpu/keys/rotate")).bearer_auth(&key).json(&json!({"providerId": id})).send().await.unwrap();
    assert_eq!(rotated.status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(chunk)) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream did not end: {text}");
    assert!(text.contains("\"error\""), "an error event: {text}");
    assert!(link_closed(&gw, &id).await);
    let rows = recorded_usage(&gw).await;
    assert_eq!((rows[0].0.as_str(), rows[0].3), ("provider_failed", 1), "{rows:?}");
    gw.ledger_is_clean().await;
    match dial_to(&gw.base, &id, &key).connect().await {
        Err(link::DialError::Refused { status, .. }) => assert_eq!(status, 401),
        other => panic!("the old key opened a link: {:?}", other.map(|_| ())),
    }
    assert_eq!(mock.request_count(), 1);
    worker.stop().await;
}

/// A second link with the same key replaces the first, whose open stream finishes.
#[tokio::test]
async fn inproc_a_second_link_replaces_the_first() {
    let gw = Gateway::start().await;
    let (first, id, key, first_worker) = linked_mock(&gw, MockConfig::default()).await;
    let first_link = wait_link(&gw, &id, None).await;
    let user_key = gw.create_key("premium").await;
    let r = gw.chat(&user_key, stream_body("[slow] take your time")).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::from_utf8_lossy(&body.next().await.unwrap().unwrap()).into_owned();
    let (second, app) = mock_app(([0, 0, 0, 0], 0).into(), MockConfig::default());
    let second_worker = Worker::start(dial_to(&gw.base, &id, &key), app);
    wait_link(&gw, &id, Some(first_link)).await;
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("Paris") && text.trim_end().ends_with("data: [DONE]"), "the first link's stream finished: {text}");
    let r = gw.chat(&user_key, stream_body("next")).await;
    assert!(read_all(r).await.contains("Paris"));
    assert_eq!((first.request_count(), second.request_count()), (1, 1));
    second_worker.stop().await;
    first_worker.stop().await;
}

/// Who may not open a link: no upgrade, a wrong key, a `direct` provider, a suspended
/// one (whose open link is closed), an address that holds `max_links_per_ip` already.
#[tokio::test]
async fn inproc_links_are_refused_to_strangers_and_past_the_cap() {
    let gw = Gateway::start_with(|c| c.max_links_per_ip = 2).await;
    let (id, key) = register_dial_out(&gw, 4).await;
    let r = gw.http.get(gw.url("/api/gpu/link")).bearer_auth(&key).header("x-provider-id", &id).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let refused = |dial: link::Dial| async move {
        match dial.connect().await {
            Err(link::DialError::Refused { status, body }) => (status.as_u16(), body),
            other => panic!("not refused: {:?}", other.map(|_| ())),
        }
    };
    assert_eq!(refused(dial_to(&gw.base, &id, "pk-wrong")).await.0, 401);
    let direct = gw.add_provider(&tests::spawn_mock(MockConfig::default()).await.unwrap(), "mock-model", None, &["standard"]).await;
    let (status, body) = refused(dial_to(&gw.base, &direct.0, &direct.1)).await;
    assert_eq!(status, 400, "{body}");

    let (_, app) = mock_app(([0, 0, 0, 0], 0).into(), MockConfig::default());
    let first = Worker::start(dial_to(&gw.base, &id, &key), app.clone());
    wait_link(&gw, &id, None).await;
    let (id2, key2) = register_dial_out(&gw, 4).await;
    let second = Worker::start(dial_to(&gw.base, &id2, &key2), app.clone());
    wait_link(&gw, &id2, None).await;
    let (id3, key3) = register_dial_out(&gw, 4).await;
    let (status, body) = refused(dial_to(&gw.base, &id3, &key3)).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too_many_links"), "{body}");

    let r = gw.admin_post(&format!("/api/admin/providers/{id}/suspend"), json!({})).await;
    assert_eq!(r.status(), 200);
    assert!(link_closed(&gw, &id).await, "a suspended provider's link is closed");
    assert_eq!(refused(dial_to(&gw.base, &id, &key)).await.0, 403);
    first.stop().await;
    second.stop().await;
}

/// Only the gateway opens streams on a link: a worker that talks HTTP/2 client
/// towards the gateway gets nothing and never comes on line.
#[tokio::test]
async fn inproc_a_worker_cannot_open_streams_towards_the_gateway() {
    let gw = Gateway::start().await;
    let (id, key) = register_dial_out(&gw, 4).await;
    let io = dial_to(&gw.base, &id, &key).connect().await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(
        hyper_util::rt::TokioExecutor::new(),
        io,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("http://gateway/api/admin/providers")
        .header("authorization", format!("Bearer {ADMIN}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(15), sender.send_request(request)).await;
    assert!(!matches!(answered, Ok(Ok(_))), "the gateway answered a stream the worker opened");
    assert!(gw.state.registry.get(&id).unwrap().load.link().is_none());
}

/// `HTTPS_PROXY`-style egress: the link goes through an HTTP CONNECT proxy.
#[tokio::test]
async fn inproc_a_link_goes_through_a_connect_proxy() {
    let gw = Gateway::start().await;
    let (id, key) = register_dial_out(&gw, 4).await;
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://user:secret@{}", proxy.local_addr().unwrap());
    let tunnels: Arc<parking_lot::Mutex<Vec<String>>> = Arc::default();
    let seen = tunnels.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = proxy.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    head.push(client.read_u8().await.unwrap());
                }
                let head = String::from_utf8(head).unwrap();
                seen.lock().push(head.clone());
                let target = head.split_whitespace().nth(1).unwrap().to_owned();
                let mut upstream = tokio::net::TcpStream::connect(target).await.unwrap();
                client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    let (mock, app) = mock_app(([0, 0, 0, 0], 0).into(), MockConfig::default());
    let mut dial = dial_to(&gw.base, &id, &key);
    dial.proxy = Some(proxy_url);
    let worker = Worker::start(dial, app);
    wait_link(&gw, &id, None).await;
    let user_key = gw.create_key("premium").await;
    assert!(read_all(gw.chat(&user_key, stream_body("hi")).await).await.contains("Paris"));
    assert_eq!(mock.request_count(), 1);
    let tunnels = tunnels.lock().clone();
    assert_eq!(tunnels.len(), 1, "{tunnels:?}");
    let port = gw.base.rsplit(':').next().unwrap();
    assert!(tunnels[0].starts_with(&format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n")), "{}", tunnels[0]);
    assert!(tunnels[0].contains("Proxy-Authorization: Basic dXNlcjpzZWNyZXQ=\r\n"), "{}", tunnels[0]);
    worker.stop().await;
}

/// A middlebox that cuts connections idle for 30 s does not cut a link: its pings
/// keep it busy, so after 40 s idle the same link still serves.
#[tokio::test]
async fn a_link_outlives_a_middlebox_that_cuts_idle_connections() {
    let gw = Gateway::start().await;
    let (id, key) = register_dial_out(&gw, 4).await;
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_url = format!("http://{}", relay.local_addr().unwrap());
    let upstream_addr = gw.base.trim_start_matches("http://").to_owned();
    let (accepted, cut) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (accepted_, cut_) = (accepted.clone(), cut.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = relay.accept().await {
            accepted_.fetch_add(1, Ordering::SeqCst);
            let upstream = tokio::net::TcpStream::connect(&upstream_addr).await.unwrap();
            let cut = cut_.clone();
            tokio::spawn(async move {
                if idle_cutting_copy(client, upstream, Duration::from_secs(30)).await {
                    cut.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    let (mock, app) = mock_app(([0, 0, 0, 0], 0).into(), MockConfig::default());
    let worker = Worker::start(dial_to(&relay_url, &id, &key), app);
    let link_id = wait_link(&gw, &id, None).await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    let user_key = gw.create_key("premium").await;
    assert!(read_all(gw.chat(&user_key, stream_body("still there?")).await).await.contains("Paris"));
    assert_eq!(mock.request_count(), 1);
    assert_eq!(wait_link(&gw, &id, None).await, link_id, "the same link");
    assert_eq!((accepted.load(Ordering::SeqCst), cut.load(Ordering::SeqCst)), (1, 0));
    worker.stop().await;
}

/// Copies both ways until either side closes, or until nothing moved for `idle`
/// (then both are closed, as a NAT box that forgot the connection would). Returns
/// whether it cut.
async fn idle_cutting_copy(a: tokio::net::TcpStream, b: tokio::net::TcpStream, idle: Duration) -> bool {
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let (mut abuf, mut bbuf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    loop {
        tokio::select! {
            n = ar.read(&mut abuf) => match n {
                Ok(n) if n > 0 => if bw.write_all(&abuf[..n]).await.is_err() { return false },
                _ => return false,
            },
            n = br.read(&mut bbuf) => match n {
                Ok(n) if n > 0 => if aw.write_all(&bbuf[..n]).await.is_err() { return false },
                _ => return false,
            },
            () = tokio::time::sleep(idle) => return true,
        }
    }
}

/// An `https` gateway: the link is TLS (ALPN http/1.1 for the upgrade), trusting the
/// gateway's certificate as `--gateway-ca` would.
#[tokio::test]
async fn inproc_a_link_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let gw = Gateway::start_with(|c| {
        c.tls_cert = Some(cert_path.clone());
        c.tls_key = Some(key_path);
    })
    .await;
    let base = gw.base.replace("http://127.0.0.1", "https://localhost");
    let https = reqwest::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap()).build().unwrap();
    let r = https
        .post(format!("{base}/api/gpu/register"))
        .bearer_auth(ADMIN)
        .json(&json!({"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 4}, "pricing": {"perToken": 0.000002}, "connection": "dialOut"}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let (id, key) = (v["providerId"].as_str().unwrap().to_owned(), v["providerKey"].as_str().unwrap().to_owned());
    let r = https.post(format!("{base}/api/gpu/stream/start")).bearer_auth(&key)
        .json(&json!({"providerId": id, "model": "mock-model", "quality": "standard"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Without the gateway's certificate the link is refused by TLS.
    assert!(matches!(dial_to(&base, &id, &key).connect().await, Err(link::DialError::Io(_) | link::DialError::Tls(_))));
    let mut dial = dial_to(&base, &id, &key);
    dial.extra_roots = link::load_roots(&cert_path).unwrap();
    let (mock, app) = mock_app(([0, 0, 0, 0], 0).into(), MockConfig::default());
    let worker = Worker::start(dial, app);
    wait_link(&gw, &id, None).await;
    let created: Value = https.post(format!("{base}/api/admin/keys")).bearer_auth(ADMIN)
        .json(&json!({"name": "tls", "tier": "premium"})).send().await.unwrap().json().await.unwrap();
    let r = https.post(format!("{base}/api/admin/users/{}/credit", created["userId"].as_str().unwrap())).bearer_auth(ADMIN)
        .json(&json!({"amount": 10})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let user_key = created["key"].as_str().unwrap();
    let r = https.post(format!("{base}/v1/chat/completions")).bearer_auth(user_key).json(&stream_body("hi")).send().await.unwrap();
    assert!(read_all(r).await.contains("Paris"));
    assert_eq!(mock.request_count(), 1);
    worker.stop().await;
}

/// Two replicas on one database: the worker's link is held by A; a request that
/// reaches B is forwarded to A (signed; only to a configured peer) and billed by B.
#[tokio::test]
async fn inproc_a_request_at_another_replica_reaches_the_link_through_its_replica() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let url = crate::inproc::fresh_database(&a_dir).await.0;
    let (a_listener, b_listener) =
        (tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    let (a_url, b_url) = (format!("http://{}", a_listener.local_addr().unwrap()), format!("http://{}", b_listener.local_addr().unwrap()));
    let replicas = |own: &str| {
        let (own, peers) = (own.to_owned(), vec![a_url.clone(), b_url.clone()]);
        move |c: &mut gateway::ops::config::Config| {
            c.replica_url = Some(own);
            c.replica_peers = peers;
            c.relay_secret_key = Some(gateway::ops::config::Secret::new("replicas-share-this-key-0123456789"));
        }
    };
    let a = Gateway::start_listening(url.clone(), a_dir, a_listener, replicas(&a_url)).await;
    let b = Gateway::start_listening(url, b_dir, b_listener, replicas(&b_url)).await;
    let (mock, id, _, worker) = linked_mock(&a, MockConfig::default()).await;
    let mut live = false;
    for _ in 0..100 {
        b.state.registry.reload().await.unwrap();
        let provider = b.state.registry.get(&id).unwrap();
        if provider.is_live(gateway::store::now_ms(), b.state.config.stale_after_ms()) {
            assert!(provider.load.link().is_none(), "B holds no link itself");
            live = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(live, "B sees the provider live through A");
    let key = b.create_key("premium").await;
    let text = read_all(b.chat(&key, stream_body("What is the capital of France?")).await).await;
    assert!(text.contains("Paris") && text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(mock.request_count(), 1);
    let rows = recorded_usage(&b).await;
    assert_eq!((rows.len(), rows[0].0.as_str(), rows[0].1.as_str()), (1, "ok", id.as_str()));
    b.ledger_is_clean().await;

    // The hop is signed: an unsigned or badly signed forward is refused.
    let forward = |signature: &str| {
        a.http
            .post(a.url("/api/replica/link"))
            .header("x-gs-provider", &id)
            .header("x-gs-path", "/v1/chat/completions")
            .header("x-gs-timestamp", gateway::store::now_ms().to_string())
            .header("x-gs-signature", signature)
            .json(&stream_body("free ride?"))
            .send()
    };
    assert_eq!(forward("00").await.unwrap().status(), 401);
    assert_eq!(a.http.post(a.url("/api/replica/link")).json(&stream_body("x")).send().await.unwrap().status(), 401);
    assert_eq!(mock.request_count(), 1);

    // The link closes: A clears its record, and B stops routing there.
    worker.stop().await;
    let mut gone = false;
    for _ in 0..100 {
        b.state.registry.reload().await.unwrap();
        if !b.state.registry.get(&id).unwrap().is_live(gateway::store::now_ms(), b.state.config.stale_after_ms()) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "B no longer routes to a closed link");
}
