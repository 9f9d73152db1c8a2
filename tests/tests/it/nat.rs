//! A home GPU behind NAT (issue #21): the real worker with the default model in its own
//! network namespace, joined by a veth pair to this host. It can open connections to
//! the gateway; the gateway cannot open any to it (nothing in the namespace listens
//! beyond loopback, asserted). The worker dials out (no `--public-url`); the OpenAI
//! Python SDK streams a real answer through the gateway; a client that leaves stops its
//! generation on the worker; a restarted gateway has the worker back within 10 s.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::cli::{run, serve_with, ADMIN};
use crate::real_worker::default_model_path;
use crate::sdk::{free_port, gateway_bin};

/// A network namespace with a veth pair to this host: the host end is `10.231.N.1`, the
/// namespace's `10.231.N.2`. Removed when dropped.
struct Namespace {
    name: String,
    host_ip: String,
    inner_ip: String,
}

fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Namespace {
    fn create() -> Self {
        let n = std::process::id() % 200 + 20;
        let name = format!("gs-nat-{n}");
        let (host_if, inner_if) = (format!("gsh{n}"), format!("gsn{n}"));
        let (host_ip, inner_ip) = (format!("10.231.{n}.1"), format!("10.231.{n}.2"));
        let _ = std::process::Command::new("ip").args(["netns", "del", &name]).output();
        let _ = std::process::Command::new("ip").args(["link", "del", &host_if]).output();
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name: name.clone(), host_ip: host_ip.clone(), inner_ip: inner_ip.clone() };
        sh(&["ip", "link", "add", &host_if, "type", "veth", "peer", "name", &inner_if]);
        sh(&["ip", "link", "set", &inner_if, "netns", &name]);
        sh(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        sh(&["ip", "netns", "exec", &name, "ip", "addr", "add", &format!("{inner_ip}/30"), "dev", &inner_if]);
        sh(&["ip", "netns", "exec", &name, "ip", "link", "set", &inner_if, "up"]);
        sh(&["ip", "netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `ip netns exec NAME program args…`
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    async fn output(&self, args: &[&str]) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.name]).args(args).output().await.unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// The worker's `/metrics`, read from inside its namespace (it listens on loopback).
async fn worker_metrics(ns: &Namespace, port: u16) -> String {
    const GET: &str = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())";
    ns.output(&["python3", "-c", GET, &format!("http://127.0.0.1:{port}/metrics")]).await
}

async fn gateway(dir: &Path, port: u16, tokenizers: &str) -> Child {
    serve_with(dir, port, &[("GATEWAY_HOST", "0.0.0.0"), ("GATEWAY_TOKENIZERS", tokenizers)]).await
}

/// The provider's admin view once it is on line over its link (`timeout` at most).
async fn wait_online(http: &reqwest::Client, base: &str, timeout: Duration) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{base}/api/admin/providers")).bearer_auth(ADMIN).send().await {
            let v: Value = r.json().await.unwrap_or_default();
            if v["data"][0]["online"] == true {
                return Some(v["data"][0].clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join(".venv/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/test.sh", python.display());
    python
}

const SDK_STREAM: &str = r#"
import os, openai
client = openai.OpenAI(base_url=os.environ["BASE"], api_key=os.environ["KEY"])
stream = client.chat.completions.create(model=os.environ["MODEL"], stream=True, temperature=0,
    messages=[{"role": "user", "content": "What is the capital of France?"}])
print("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
"#;

/// The OpenAI Python SDK streams an answer through the gateway; it names Paris.
async fn sdk_answers_paris(base: &str, key: &str) {
    let out = Command::new(python())
        .args(["-c", SDK_STREAM])
        .env("BASE", format!("{base}/v1"))
        .env("KEY", key)
        .env("MODEL", "smollm2-135m-instruct")
        .output()
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && answer.contains("Paris"), "{answer}{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_behind_nat_serves_through_its_link() {
    let ns = Namespace::create();
    let model_path = default_model_path().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let tokenizers = format!("{{ \"smollm2-135m-instruct\" = '{}' }}", model_path.display());
    let mut gw = gateway(dir.path(), port, &tokenizers).await;
    let base = format!("http://127.0.0.1:{port}");
    let worker_port = free_port().unwrap();
    let worker_log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let mut worker = ns
        .command(&gateway_bin().unwrap().with_file_name("worker"))
        .args(["serve", "--model"])
        .arg(&model_path)
        .args(["--port", &worker_port.to_string(), "--gateway", &format!("http://{}:{port}", ns.host_ip)])
        .arg("--key-file")
        .arg(dir.path().join("provider.json"))
        .stdout(Stdio::null())
        .stderr(worker_log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let log = || std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    let provider = wait_online(&http, &base, Duration::from_secs(120)).await.unwrap_or_else(|| panic!("never on line: {}", log()));
    assert_eq!(provider["connection"], "dialOut", "{provider}");
    assert!(provider["baseUrl"].is_null());

    // Nothing in the namespace listens beyond loopback, and the gateway's side cannot
    // reach the worker's port.
    let listening = ns.output(&["ss", "-ltnH"]).await;
    assert!(listening.contains(&format!("127.0.0.1:{worker_port}")), "{listening}");
    for line in listening.lines() {
        let local = line.split_whitespace().nth(3).unwrap_or_default();
        assert!(local.starts_with("127.") || local.starts_with("[::1]"), "listens beyond loopback: {line}");
    }
    let reach = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect((ns.inner_ip.as_str(), worker_port))).await;
    assert!(!matches!(reach, Ok(Ok(_))), "the gateway's host reached the worker's port");

    let key: Value = http.post(format!("{base}/api/admin/keys")).bearer_auth(ADMIN)
        .json(&json!({"name": "nat", "tier": "premium"})).send().await.unwrap().json().await.unwrap();
    let r = http.post(format!("{base}/api/admin/users/{}/credit", key["userId"].as_str().unwrap())).bearer_auth(ADMIN)
        .json(&json!({"amount": 10})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let key = key["key"].as_str().unwrap().to_owned();
    sdk_answers_paris(&base, &key).await;

    // A client that leaves: its generation stops on the worker (its cancel counter).
    let metrics = || worker_metrics(&ns, worker_port);
    let cancelled = |m: &str| m.lines().find_map(|l| l.strip_prefix("worker_cancelled_total ")).and_then(|v| v.trim().parse::<u64>().ok());
    assert_eq!(cancelled(&metrics().await), Some(0));
    let r = http.post(format!("{base}/v1/chat/completions")).bearer_auth(&key)
        .json(&json!({"model": "smollm2-135m-instruct", "stream": true, "max_tokens": 2000, "temperature": 1,
            "messages": [{"role": "user", "content": "Write a very long story about a fox."}]}))
        .send().await.unwrap();
    let mut body = r.bytes_stream();
    let mut text = String::new();
    while !text.contains("\"content\":\"") || text.matches("data: ").count() < 4 {
        text.push_str(&String::from_utf8_lossy(&body.next().await.unwrap().unwrap()));
    }
    drop(body);
    let mut stopped = None;
    for _ in 0..100 {
        let m = metrics().await;
        if cancelled(&m) == Some(1) && m.contains("worker_active_streams 0") {
            stopped = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stopped.is_some(), "the worker did not stop the generation: {}", metrics().await);

    // The gateway restarts; the worker is back on line within 10 s of it answering.
    let _ = Command::new("kill").args(["-TERM", &gw.id().unwrap().to_string()]).status().await;
    let _ = tokio::time::timeout(Duration::from_secs(20), gw.wait()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _gw = gateway(dir.path(), port, &tokenizers).await;
    let answering = Instant::now();
    let back = wait_online(&http, &base, Duration::from_secs(10)).await;
    assert!(back.is_some(), "not back on line within 10 s: {}", log());
    eprintln!("worker back on line {:?} after the gateway answered again", answering.elapsed());
    sdk_answers_paris(&base, &key).await;

    // SIGTERM during a stream: the worker drains it over the link, then exits.
    let r = http.post(format!("{base}/v1/chat/completions")).bearer_auth(&key)
        .json(&json!({"model": "smollm2-135m-instruct", "stream": true, "max_tokens": 30, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me a story about a fox."}]}))
        .send().await.unwrap();
    let mut body = r.bytes_stream();
    let mut text = String::from_utf8_lossy(&body.next().await.unwrap().unwrap()).into_owned();
    let _ = Command::new("kill").args(["-TERM", &worker.id().unwrap().to_string()]).status().await;
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("\"finish_reason\":\"length\"") && text.trim_end().ends_with("data: [DONE]"), "{text}");
    let exited = tokio::time::timeout(Duration::from_secs(20), worker.wait()).await;
    assert!(matches!(exited, Ok(Ok(status)) if status.success()), "{exited:?}: {}", log());
    drop(_gw);
    let (code, report) = run(dir.path(), &["ledger", "check"]).await;
    assert_eq!(code, 0, "{report}");
}
