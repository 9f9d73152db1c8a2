//! The burn engine on burn-wgpu over Mesa's software Vulkan driver (lavapipe): the
//! CubeCL kernels CUDA runs, checked without a GPU. These tests need the `wgpu`
//! feature and lavapipe (`apt-get install mesa-vulkan-drivers`); scripts/test.sh
//! provides both. Without them they fail, never skip.

#[cfg(feature = "wgpu")]
mod on_lavapipe {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use serde_json::{json, Value};
    use tower::ServiceExt;
    use worker::backend::{open_burn, wgpu_adapter, BurnDevice, Opened};
    use worker::engine::{Engine, EngineConfig};
    use worker::server::{app, AppState};

    use worker::burn_model::Dtype;
    use worker::sampling::argmax;

    use crate::burn::{check_against_native, golden_answer_through_the_engine, golden_prompts, logits_per_position, max_abs_diff, small_cache, small_cache_in};
    use crate::{call, model};

    /// burn-wgpu on lavapipe, asserting that it is lavapipe: a silent fallback to any
    /// other adapter (or to ndarray) fails here.
    fn on_lavapipe() -> Opened {
        let adapter = wgpu_adapter().unwrap_or_else(|e| panic!("{e}"));
        assert!(adapter.name.contains("llvmpipe") && adapter.driver == "llvmpipe", "not lavapipe: {adapter:?}");
        assert!(adapter.is_cpu, "{adapter:?}");
        let m = model();
        let opened = open_burn(&m.model, BurnDevice::Wgpu, small_cache(&m.model)).unwrap();
        assert_eq!((opened.device.engine, opened.device.kind, opened.device.weights), ("burn-wgpu", "vulkan", "f32"));
        assert!(opened.device.name.contains("llvmpipe"), "{}", opened.device.name);
        opened
    }

    /// The sentence encoder on lavapipe, as `serve --embedding-model` puts it beside a
    /// burn-wgpu chat model: the native encoder's vectors, padded batches included.
    #[test]
    fn lavapipe_encodes_sentences_like_the_native_encoder() {
        let encoder = std::sync::Arc::new(worker::bert::Encoder::load(&crate::embeddings::minilm_dir()).unwrap());
        let (compute, engine) = worker::backend::open_encoder(&encoder, "burn-wgpu").unwrap();
        assert_eq!(engine, "burn-wgpu");
        let ids = crate::embeddings::golden_ids();
        let (worst, padded) = crate::embeddings::against_native(compute.as_ref(), &ids[..6]);
        eprintln!("burn-wgpu encoder on lavapipe: worst cosine distance from native {worst:e}; alone vs padded {padded:e}");
        assert!(worst < 1e-5 && padded < 1e-5, "{worst:e} {padded:e}");
    }

    #[test]
    fn lavapipe_matches_native_exact_on_the_golden_set_alone_and_batched() {
        let opened = on_lavapipe();
        let (native, batched) = check_against_native(opened.forward.as_ref(), &model());
        eprintln!("burn-wgpu on lavapipe: worst |native - burn| {native}, worst |alone - batched| {batched}");
    }

    /// f16 on lavapipe (it has shader f16; bf16 it has not): weights, activations and
    /// cache in half precision against the native exact path. Half-type math moves
    /// logits by a few hundredths, so the bound is on argmax agreement and on the
    /// largest difference, and the greedy golden answer must come out unchanged.
    #[tokio::test]
    async fn lavapipe_in_f16_agrees_with_native_and_serves_reduced_precision_only() {
        let m = model();
        let opened = open_burn(&m.model, BurnDevice::Wgpu, small_cache_in(&m.model, Dtype::F16)).unwrap();
        assert_eq!((opened.device.engine, opened.device.weights), ("burn-wgpu", "f16"));
        assert_eq!(opened.device.precisions(), ["reduced"]);
        let prompts = golden_prompts(&m);
        let (want, _) = logits_per_position(&worker::native::Native, &m.model, &prompts, false);
        let (got, _) = logits_per_position(opened.forward.as_ref(), &m.model, &prompts, true);
        let (mut agree, mut total, mut worst) = (0, 0, 0f32);
        for (w, g) in want.iter().flatten().zip(got.iter().flatten()) {
            total += 1;
            agree += usize::from(argmax(w) == argmax(g));
            worst = worst.max(max_abs_diff(w, g));
        }
        let share = agree as f64 / total as f64;
        eprintln!("burn-wgpu f16 on lavapipe: argmax agreement {agree}/{total}, worst |native - burn| {worst}");
        assert!(share >= 0.95, "argmax agreement {agree}/{total}");
        assert!(worst < 0.5, "worst |native - burn| {worst}");
        let forward = opened.forward.clone();
        tokio::task::spawn_blocking(move || golden_answer_through_the_engine(forward, EngineConfig { max_seqs: 16, ..Default::default() }))
            .await
            .unwrap();
        // bf16 is refused by name; `full` precision is refused over HTTP.
        let err = open_burn(&m.model, BurnDevice::Wgpu, small_cache_in(&m.model, Dtype::Bf16)).err().expect("bf16 refused").to_string();
        assert!(err.contains("--dtype bf16 is not supported by llvmpipe") && err.contains("use --dtype f32"), "{err}");
        let engine = Engine::start_with(m.clone(), opened.forward, EngineConfig { max_seqs: 16, ..Default::default() });
        let st = AppState::new(engine, m.default_model_id());
        let ask = |precision: &str| {
            json!({"model": "smollm2-135m-instruct", "max_tokens": 2, "precision": precision,
                "messages": [{"role": "user", "content": "Hi"}]})
        };
        let (status, body) = call(&st, "POST", "/v1/chat/completions", Some(ask("full"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let err: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(err["error"]["param"], "precision");
        assert!(err["error"]["message"].as_str().unwrap().contains("(burn-wgpu, f16) serves \"reduced\" precision only"), "{body}");
        let (status, body) = call(&st, "POST", "/v1/chat/completions", Some(ask("reduced"))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    #[tokio::test]
    async fn lavapipe_generates_through_the_engine_and_the_http_server() {
        let opened = on_lavapipe();
        let m = model();
        let id = m.default_model_id();
        let engine = Engine::start_with(m, opened.forward, EngineConfig { max_seqs: 8, ..Default::default() });
        let st = AppState::new(engine, id);
        let body = json!({"model": "smollm2-135m-instruct", "temperature": 0, "stream": true,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]});
        let req = Request::builder()
            .method("POST")
            .uri("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = app(st.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
        let content: String = events[..events.len() - 1]
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok()?["choices"].get(0)?["delta"]["content"].as_str().map(str::to_string))
            .collect();
        assert_eq!(content, "The capital of France is Paris.");
        let req = Request::builder().uri("/health").body(Body::empty()).unwrap();
        let health = app(st).oneshot(req).await.unwrap().into_body().collect().await.unwrap().to_bytes();
        let health: Value = serde_json::from_slice(&health).unwrap();
        assert_eq!(health["backend"]["engine"], "burn-wgpu");
        assert_eq!(health["backend"]["kind"], "vulkan");
    }
}

#[cfg(not(feature = "wgpu"))]
#[test]
fn the_lavapipe_tests_need_the_wgpu_feature() {
    panic!("built without the `wgpu` feature: run the worker's tests with `--features worker/wgpu` (scripts/test.sh does)");
}
