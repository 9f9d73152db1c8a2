#!/usr/bin/env bash
# The worker against PyTorch `transformers` on one NVIDIA GPU, in one command and one
# table: prefill tok/s, decode tok/s at 1, 8, 32 and 64 streams, TTFT, device memory,
# the share of memory bandwidth used, and parity (argmax agreement over 512 positions,
# max |Δlogit|), on a Llama-shaped ~1B model with seeded random bf16 weights and the
# default model's real tokenizer. Meant to finish in under 6 minutes on an H100.
#
# Two steps, because a GPU machine may have no Rust toolchain and no internet:
#
#   worker/scripts/gpu-check.sh prepare     # here: builds the worker with --features
#                                           # cuda and writes the tokenizer, into
#                                           # target/gpu-check/ (about 40 MiB)
#   worker/scripts/gpu-check.sh run         # on the GPU machine (PyTorch, transformers)
#
# With the device tool: run `prepare` here, then `run` there carrying
# target/gpu-check. Options of `run`:
#   --size 1b|tiny           model shape (default 1b; tiny checks the plumbing on a CPU)
#   --burn-device cuda|wgpu|ndarray   where the worker computes (default cuda)
#   --dtype bf16|f16|f32     the worker's --dtype (default: the device's default)
#   --worker PATH            worker binary (default target/gpu-check/worker)
#   --tokenizer DIR          tokenizer.json + tokenizer_config.json (default target/gpu-check/tokenizer)
#   --out DIR                run folder (default target/gpu-check/run)
#   --streams LIST           default 1,8,32,64
#   --python PATH            default python3
# Without PyTorch or without a CUDA device the transformers column says why it is
# empty; the worker's columns are still measured.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
kit="${CARGO_TARGET_DIR:-target}/gpu-check"

step() { printf '\n==> %s (%ss)\n' "$1" "$SECONDS" >&2; }

prepare() {
    local python="${PYTHON:-python3}" gguf
    step "Worker with --features cuda (release)"
    cargo build --release -p worker --features cuda
    mkdir -p "$kit"
    cp "${CARGO_TARGET_DIR:-target}/release/worker" "$kit/worker"
    strip "$kit/worker" 2>/dev/null || true
    step "Tokenizer of the default model"
    gguf="$("${CARGO_TARGET_DIR:-target}/release/worker" fetch-model)"
    "$python" -c "import numpy" 2>/dev/null || python="$(worker/scripts/setup-reference.sh)"
    "$python" worker/tests/reference/gguf_to_hf.py --tokenizer-only "$gguf" "$kit/tokenizer"
    du -sh "$kit" >&2
    echo "ready: carry $kit and run worker/scripts/gpu-check.sh run" >&2
}

run() {
    local size=1b device=cuda dtype="" worker="$kit/worker" tokenizer="$kit/tokenizer" out="$kit/run"
    local streams=1,8,32,64 python="${PYTHON:-python3}"
    while [ $# -gt 0 ]; do
        case "$1" in
            --size) size="$2" ;;
            --burn-device) device="$2" ;;
            --dtype) dtype="$2" ;;
            --worker) worker="$2" ;;
            --tokenizer) tokenizer="$2" ;;
            --out) out="$2" ;;
            --streams) streams="$2" ;;
            --python) python="$2" ;;
            *) echo "gpu-check.sh run: unknown option $1" >&2; exit 2 ;;
        esac
        shift 2
    done
    [ -x "$worker" ] || { echo "no worker binary at $worker: run \`worker/scripts/gpu-check.sh prepare\` first" >&2; exit 1; }
    [ -f "$tokenizer/tokenizer.json" ] || { echo "no tokenizer.json in $tokenizer: run \`worker/scripts/gpu-check.sh prepare\` first" >&2; exit 1; }
    rm -rf "$out"
    mkdir -p "$out"
    local flags=(--backend burn --burn-device "$device")
    [ -n "$dtype" ] && flags+=(--dtype "$dtype")
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
    fi

    step "Model: Llama $size, seeded random bf16 weights"
    "$python" "$here/gpu_check.py" make-model --size "$size" --tokenizer "$tokenizer" --out "$out/model"

    step "Worker: logits of 512 positions"
    # A long, varied text: the worker tokenizes it and writes the ids it used, which
    # transformers then reads, so both see the same sequence.
    "$python" - "$out/parity.txt" <<'EOF'
import sys
text = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
    "panels; later, stored programs let the same hardware run any algorithm. Compilers turned formulas "
    "into instructions, operating systems shared one processor among many users, and networks joined "
    "machines into a single, planet-sized computer. In 1969 the first message crossed ARPANET; by 1995 "
    "millions browsed the Web. Today a graphics card holds 80 GB of memory and reads it at 3 TB/s, and "
    "language models with a billion parameters answer questions, write code (def f(x): return x * 2) "
    "and translate between languages: «Bonjour», „Guten Tag“, 你好, こんにちは. "
)
open(sys.argv[1], "w").write(text * 6)
EOF
    timeout 300 "$worker" logits --model "$out/model" --text "$out/parity.txt" --max-tokens 512 \
        --tokens-out "$out/ids.txt" --out "$out/worker_logits.bin" "${flags[@]}"

    step "Worker: bench (512-token prompt, 128 decode tokens, streams $streams)"
    timeout 300 "$worker" bench --model "$out/model" --prompt-tokens 512 --decode-tokens 128 --streams "$streams" \
        --json "$out/worker_bench.json" "${flags[@]}" >&2

    step "transformers: the same model, prompts and stream counts"
    timeout 300 "$python" "$here/gpu_check.py" torch --model "$out/model" --ids "$out/ids.txt" --out "$out" \
        --prompt-tokens 512 --decode-tokens 128 --streams "$streams" >&2 || echo "transformers failed (exit $?)" >&2

    step "Table"
    "$python" "$here/gpu_check.py" table --out "$out" | tee "$out/table.md"
    echo "total ${SECONDS}s" >&2
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    *) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
