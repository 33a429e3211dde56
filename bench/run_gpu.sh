#!/usr/bin/env bash
# Run the benchmark suite on a CUDA GPU, write bench/results/<device>.json and the report.
#
#   bash bench/run_gpu.sh                # whole suite (layers, end-to-end step, regularizer)
#   bash bench/run_gpu.sh --issue3       # issue 3's benchmark only: bench/results/<device>-issue3.json
#   bash bench/run_gpu.sh -k "r64"       # anything else is passed to pytest
#
# The report (bench/results/<name>.md and .png) is written even when some benchmark
# failed; the script then exits with pytest's status.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python}
suffix=""
args=()
for arg in "$@"; do
    if [[ "$arg" == "--issue3" ]]; then
        suffix="-issue3"
        args+=(bench/bench_linear.py -m issue3)
    else
        args+=("$arg")
    fi
done
[[ -z "$suffix" ]] && args=(bench/ "${args[@]}")

device=$("$python" - <<'EOF'
import re, sys
import torch
if not torch.cuda.is_available():
    sys.exit("bench/run_gpu.sh needs a CUDA GPU; on CPU run: pytest bench/ --benchmark-only")
print(re.sub(r"[^A-Za-z0-9._-]+", "-", torch.cuda.get_device_name()).strip("-"))
EOF
)
mkdir -p bench/results
json="bench/results/${device}${suffix}.json"

status=0
"$python" -m pytest "${args[@]}" --benchmark-only --benchmark-json "$json" -rs || status=$?
if [[ -s "$json" ]]; then
    "$python" -m bench.report "$json" --out bench/results
else
    echo "no results written to $json" >&2
fi
exit "$status"
