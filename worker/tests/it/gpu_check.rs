//! worker/scripts/gpu-check.sh's own steps on this machine: the tiny model made with
//! numpy, the worker's logits and bench on burn-ndarray, and the table, with the
//! transformers column saying why it is empty (no PyTorch here). The GPU run itself
//! happens on a GPU machine; this keeps the script from rotting between those runs.

use std::path::Path;
use std::process::Command;

use crate::{model_path, parity::python};

#[test]
fn the_gpu_check_runs_its_steps_on_a_tiny_model_here() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tokenizer = dir.path().join("tokenizer");
    let status = Command::new(python())
        .arg(root.join("tests/reference/gguf_to_hf.py"))
        .arg("--tokenizer-only")
        .arg(model_path())
        .arg(&tokenizer)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(!tokenizer.join("model.safetensors").exists(), "--tokenizer-only wrote the weights");
    let out = dir.path().join("run");
    let run = Command::new(root.join("scripts/gpu-check.sh"))
        .args(["run", "--size", "tiny", "--burn-device", "ndarray", "--streams", "1,2"])
        .arg("--worker")
        .arg(env!("CARGO_BIN_EXE_worker"))
        .arg("--tokenizer")
        .arg(&tokenizer)
        .arg("--out")
        .arg(&out)
        .arg("--python")
        .arg(python())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    eprintln!("{stdout}");
    // The worker's columns are measured; the model is the tokenizer's vocabulary.
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("model/config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 49152);
    let ids = std::fs::read_to_string(out.join("ids.txt")).unwrap();
    assert_eq!(ids.trim().split(',').count(), 512);
    let logits = std::fs::metadata(out.join("worker_logits.bin")).unwrap().len();
    assert_eq!(logits, 512 * 49152 * 4);
    assert!(stdout.contains("A: worker (burn-ndarray on"), "{stdout}");
    assert!(stdout.contains("| decode tok/s, 2 streams (aggregate) |"), "{stdout}");
    // Nothing is left out silently: the transformers column says why it is empty.
    assert!(stdout.contains("B: transformers: not run — no PyTorch/transformers here"), "{stdout}");
    assert!(stdout.contains("- target single-stream decode ≥ 300 tok/s:"), "{stdout}");
}
