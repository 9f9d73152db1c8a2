//! Worker integration tests, compiled as one binary. Tests that need the default
//! model fail (never skip) when it is missing, naming the command that fetches it.
// Helpers outside `#[test]` functions count as non-test code for clippy; this whole
// crate is tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod burn;
mod embeddings;
mod cuda_binary;
mod faults;
mod gateway;
mod generation;
mod gpu_check;
mod hf;
mod parity;
mod server;
mod structured;
mod tools;
mod wgpu;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use worker::model::LoadedModel;
use worker::server::{app, AppState};

pub fn model_path() -> PathBuf {
    let path = std::env::var_os("WORKER_TEST_MODEL").map_or_else(worker::fetch::default_model_path, PathBuf::from);
    assert!(
        path.exists(),
        "the default model is missing at {}: run `{}` first",
        path.display(),
        worker::fetch::FETCH_COMMAND
    );
    path
}

/// The default model, loaded once per test binary.
pub fn model() -> Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| match LoadedModel::load(&model_path(), false) {
            Ok(m) => Arc::new(m),
            Err(e) => panic!("cannot load the default model: {e}"),
        })
        .clone()
}

/// One request to the worker's router in process: its status and body.
pub async fn call(st: &AppState, method: &str, path: &str, body: Option<Value>) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let resp = app(st.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}
