//! What the model tests share: where `worker fetch-model` and
//! `worker fetch-model --embedding` put models.

use std::path::PathBuf;

/// `$GPU_STREAMING_MODEL_DIR`, else `~/.cache/gpu-streaming/models` (as worker/src/fetch.rs).
pub fn models_dir() -> PathBuf {
    std::env::var_os("GPU_STREAMING_MODEL_DIR").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".cache/gpu-streaming/models"),
        PathBuf::from,
    )
}
