//! The official OpenAI SDKs (Python and Node) against the real `gateway` binary in front
//! of the counted mock provider. The SDK suites live in `tests/sdk/`; these tests start
//! the processes they need, run a suite, and fail with its output when it fails.
//!
//! `scripts/test.sh` builds the gateway binary, makes the Python venv and installs the
//! Node packages first; without them these tests fail rather than skip.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use tests::{spawn_mock, MockConfig, MockProvider};
use tokio::process::{Child, Command};

const MODEL: &str = "mock-model";
const ADMIN_KEY: &str = "sdk-test-admin-key-0123456789";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `<target>/debug/gateway`: the test executable lives in `<target>/debug/deps`.
pub(crate) fn gateway_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("cannot find the target dir from {}", exe.display()))?;
    let bin = profile_dir.join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
    ensure!(
        bin.is_file(),
        "the gateway binary {} is missing: run scripts/test.sh (or `cargo build --workspace --bins`) first",
        bin.display()
    );
    Ok(bin)
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running `gateway serve` with the mock registered as a provider and a premium user key.
struct Gateway {
    child: Child,
    base: String,
    user_key: String,
    /// A free-tier key, and a funded campaign on `technology` for its ads.
    free_key: String,
    log: PathBuf,
    mock: MockProvider,
    _dir: tempfile::TempDir,
}

impl Gateway {
    async fn start() -> anyhow::Result<Self> {
        let mock = spawn_mock(MockConfig::default()).await?;
        let bin = gateway_bin()?;
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let log = dir.path().join("gateway.log");
        let child = Command::new(&bin)
            .arg("serve")
            .env("GATEWAY_DATABASE_URL", format!("sqlite://{}", dir.path().join("gw.db").display()))
            .env("GATEWAY_ADMIN_KEY", ADMIN_KEY)
            // The mock provider listens on 127.0.0.1.
            .env("GATEWAY_ALLOW_PRIVATE_PROVIDERS", "true")
            .env("GATEWAY_PROBATION_REQUESTS", "0")
            .env("GATEWAY_FREE_TIER_DAILY_BUDGET", "1000")
            .env("GATEWAY_HOST", "127.0.0.1")
            .env("GPU_STREAMING_PORT", port.to_string())
            .env("RUST_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut gateway =
            Self { child, base: format!("http://127.0.0.1:{port}"), user_key: String::new(), free_key: String::new(), log, mock, _dir: dir };
        gateway.wait_healthy().await?;
        gateway.user_key = gateway.set_up().await?;
        gateway.free_key = gateway.set_up_ads().await?;
        Ok(gateway)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the gateway exited with {status} before it was healthy; its log:\n{}", self.log_text());
            }
            if let Ok(r) = http.get(format!("{}/health", self.base)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the gateway was not healthy within 30 s; its log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Registers the mock through the provider API and creates a user key through the admin API.
    async fn set_up(&self) -> anyhow::Result<String> {
        let http = reqwest::Client::new();
        let registered = post_json(
            &http,
            &self.base,
            "/api/gpu/register",
            None,
            json!({
                "gpuInfo": {},
                "capabilities": {"models": [MODEL], "maxConcurrentStreams": 64},
                "pricing": {"perToken": 0.000002},
                "baseUrl": self.mock.url(),
            }),
        )
        .await?;
        let provider_id = registered["providerId"].as_str().context("no providerId")?;
        let provider_key = registered["providerKey"].as_str().context("no providerKey")?;
        post_json(
            &http,
            &self.base,
            "/api/gpu/stream/start",
            Some(provider_key),
            json!({"providerId": provider_id, "model": MODEL, "quality": "standard"}),
        )
        .await?;
        let key =
            post_json(&http, &self.base, "/api/admin/keys", Some(ADMIN_KEY), json!({"name": "sdk", "tier": "premium"}))
                .await?;
        // Premium keys pay from a prepaid balance: grant credit so requests are not refused (429).
        let user_id = key["userId"].as_str().context("no userId in the create-key response")?;
        post_json(&http, &self.base, &format!("/api/admin/users/{user_id}/credit"), Some(ADMIN_KEY), json!({"amount": 1000}))
            .await?;
        Ok(key["key"].as_str().context("no key in the create-key response")?.to_owned())
    }

    /// An advertiser with $10 and a CPM campaign on `technology`; returns a free-tier key.
    async fn set_up_ads(&self) -> anyhow::Result<String> {
        let http = reqwest::Client::new();
        let adv = post_json(&http, &self.base, "/api/admin/advertisers", Some(ADMIN_KEY), json!({"name": "FastIDE Inc."})).await?;
        let adv_id = adv["id"].as_str().context("no advertiser id")?;
        post_json(&http, &self.base, &format!("/api/admin/advertisers/{adv_id}/credit"), Some(ADMIN_KEY), json!({"amount": 10.0}))
            .await?;
        post_json(
            &http,
            &self.base,
            "/api/admin/campaigns",
            Some(ADMIN_KEY),
            json!({"advertiserId": adv_id, "name": "IDE launch", "categories": ["technology"], "title": "FastIDE",
                   "text": "The editor for Rust developers.", "url": "https://fastide.example/",
                   "cpmBid": 2.0, "dailyBudget": 5.0, "totalBudget": 10.0}),
        )
        .await?;
        let key = post_json(&http, &self.base, "/api/admin/keys", Some(ADMIN_KEY), json!({"name": "sdk-free", "tier": "free"})).await?;
        Ok(key["key"].as_str().context("no key in the create-key response")?.to_owned())
    }

    /// Runs an SDK suite with the gateway's coordinates and fails with its output unless it passes.
    async fn run_suite(&self, program: &Path, args: &[&str], cwd: &Path) -> anyhow::Result<()> {
        let output = tokio::time::timeout(
            Duration::from_secs(300),
            Command::new(program)
                .args(args)
                .current_dir(cwd)
                .env("GATEWAY_BASE_URL", format!("{}/v1", self.base))
                .env("GATEWAY_API_KEY", &self.user_key)
                .env("GATEWAY_FREE_KEY", &self.free_key)
                .env("GATEWAY_MODEL", MODEL)
                .env("GATEWAY_ADMIN_KEY", ADMIN_KEY)
                // Keep the SDKs from picking up a real key or proxy from the environment.
                .env_remove("OPENAI_API_KEY")
                .env_remove("OPENAI_BASE_URL")
                .env("NO_PROXY", "127.0.0.1,localhost")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .with_context(|| format!("{} did not finish within 300 s", program.display()))?
        .with_context(|| format!("cannot run {}", program.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.success(),
            "`{} {}` failed with {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- gateway log\n{}",
            program.display(),
            args.join(" "),
            output.status,
            self.log_text()
        );
        // Show the suite's own summary in the test's captured output.
        eprintln!("{stdout}{stderr}");
        Ok(())
    }

    /// Whether the provider received a request whose `stop` contains `marker`.
    fn provider_saw_stop(&self, marker: &str) -> bool {
        self.mock.bodies.lock().iter().any(|b| b["stop"].as_array().is_some_and(|s| s.iter().any(|v| v == marker)))
    }
}

async fn post_json(http: &reqwest::Client, base: &str, path: &str, bearer: Option<&str>, body: Value) -> anyhow::Result<Value> {
    let mut request = http.post(format!("{base}{path}")).json(&body);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    ensure!(status.is_success(), "POST {path}: {status} {body}");
    Ok(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_python_openai() -> anyhow::Result<()> {
    let root = repo_root();
    let python = root.join(".venv/bin/python");
    ensure!(
        python.is_file(),
        "{} is missing: run scripts/test.sh, which makes the venv from tests/sdk/python/requirements.txt",
        python.display()
    );
    let gateway = Gateway::start().await?;
    gateway.run_suite(&python, &["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/sdk/python"], &root).await?;
    ensure!(gateway.provider_saw_stop("<<py-stop>>"), "the `stop` sequences did not reach the provider");
    // test_ads.py sends our ad back in an assistant turn: the provider must never see it.
    let bodies = gateway.mock.bodies.lock().clone();
    ensure!(bodies.iter().any(|b| b.to_string().contains("And in Python?")), "the ad follow-up did not reach the provider");
    ensure!(!bodies.iter().any(|b| b.to_string().contains("[Sponsored]")), "an ad block reached the provider");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_node_openai() -> anyhow::Result<()> {
    let root = repo_root();
    let node_dir = root.join("tests/sdk/node");
    ensure!(
        node_dir.join("node_modules/openai").is_dir(),
        "{}/node_modules is missing: run scripts/test.sh, which runs `npm ci` there",
        node_dir.display()
    );
    let gateway = Gateway::start().await?;
    gateway.run_suite(Path::new("node"), &["--test", "tests/sdk/node/"], &root).await?;
    ensure!(gateway.provider_saw_stop("<<node-stop>>"), "the `stop` sequences did not reach the provider");
    Ok(())
}
