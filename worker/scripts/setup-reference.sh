#!/bin/sh
# Creates the numpy virtual environment the logits-parity test runs its reference in.
set -eu
dir="$(cd "$(dirname "$0")/.." && pwd)/tests/reference/.venv"
[ -x "$dir/bin/python" ] || python3 -m venv "$dir"
"$dir/bin/python" -c "import numpy" 2>/dev/null || "$dir/bin/pip" install --quiet "numpy>=1.26,<3"
echo "$dir/bin/python"
