//! A worker built with `--features cuda` on a machine without a CUDA driver (CI, this
//! machine): `--backend auto` starts on the native CPU path and says so once;
//! `--backend burn` refuses, naming what is missing. The binary is the one
//! scripts/test.sh builds (the workspace with `--features worker/wgpu,worker/cuda`,
//! its `worker` copied to `worker-cuda`), or `$WORKER_CUDA_BIN`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::model_path;

fn cuda_worker() -> PathBuf {
    let path = std::env::var_os("WORKER_CUDA_BIN")
        .map_or_else(|| Path::new(env!("CARGO_BIN_EXE_worker")).with_file_name("worker-cuda"), PathBuf::from);
    assert!(
        path.exists(),
        "the cuda build of the worker is missing at {}: run `cargo build --workspace --bins --features worker/wgpu,worker/cuda && cp \"$CARGO_TARGET_DIR/debug/worker\" \"$CARGO_TARGET_DIR/debug/worker-cuda\"` (scripts/test.sh does)",
        path.display()
    );
    path
}

fn generate(backend: &str) -> std::process::Output {
    Command::new(cuda_worker())
        .args(["generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "12", "--backend", backend])
        .arg("--model")
        .arg(model_path())
        .env("RUST_LOG", "info")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .unwrap()
}

#[test]
fn cuda_build_without_a_driver_runs_native_under_auto_and_refuses_burn() {
    let out = generate("auto");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("The capital of France is Paris."), "{stdout}");
    assert_eq!(stderr.matches("burn on CUDA is not usable").count(), 1, "one line says why: {stderr}");
    assert!(stderr.contains("native-cpu") && !stderr.contains("burn-cuda"), "{stderr}");
    assert!(!stderr.contains("panicked"), "the failed probe is not a panic message: {stderr}");

    let out = generate("burn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--burn-device cuda: no usable device"), "{stderr}");
}
