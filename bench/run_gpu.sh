#!/usr/bin/env bash
# Run the benchmark suite on a CUDA GPU; write bench/results/<device>-<date>[-quick|-issue3].json,
# its .md report (and .png when matplotlib is installed).
#
#   bash bench/run_gpu.sh                  # whole suite (layers, end-to-end step, regularizer)
#   bash bench/run_gpu.sh --quick          # GPU tests (-m gpu) + the targets' subset (-m quick), < 8 min on one H100
#   bash bench/run_gpu.sh --quick --compiled-loop   # … plus the torch.compile regularizer baseline (minutes of compiling)
#   bash bench/run_gpu.sh --quick --skip-tests      # the quick benchmarks without the GPU tests
#   bash bench/run_gpu.sh --issue3         # issue 3's benchmark only
#   bash bench/run_gpu.sh --dry-run …      # print the commands, run nothing (works without a GPU)
#   bash bench/run_gpu.sh -k "r64"         # anything else is passed to the benchmark's pytest
#
# Needs python3 with torch, triton, transformers, peft and pytest-benchmark.  bitsandbytes and
# matplotlib are optional: without bitsandbytes the qlora/qsorsa benchmarks are skipped with the
# reason; without matplotlib the report is markdown only (bench/README.md says how to add both).
# PYTHON=/path/to/python overrides the interpreter.
#
# The report is written even when some benchmark failed.  Exit status: pytest's — that of the
# first pytest run that failed (GPU tests, then benchmarks), 0 when all passed.  A GPU-test
# step that selects no test (pytest status 5) is reported and not counted as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
mode=full
compiled_loop=0
skip_tests=0
dry_run=0
extra=()
for arg in "$@"; do
    case "$arg" in
        --quick) mode=quick ;;
        --issue3) mode=issue3 ;;
        --compiled-loop) compiled_loop=1 ;;
        --skip-tests) skip_tests=1 ;;
        --dry-run) dry_run=1 ;;
        *) extra+=("$arg") ;;
    esac
done
if [[ "$compiled_loop" == 1 && "$mode" != quick ]]; then
    echo "--compiled-loop applies to --quick (the full suite always includes the compiled baseline)" >&2
    exit 2
fi
if [[ "$skip_tests" == 1 && "$mode" != quick ]]; then
    echo "--skip-tests applies to --quick (only --quick runs the GPU tests)" >&2
    exit 2
fi

# The repository first on the path (no install needed); keep what the caller set (e.g. a
# --target folder holding a carried bitsandbytes wheel, see bench/README.md).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$dry_run" == 1 ]]; then
    device="DEVICE"
else
    device=$("$python" -c '
import re, sys
import torch
if not torch.cuda.is_available():
    sys.exit("bench/run_gpu.sh needs a CUDA GPU; on CPU run: pytest bench/ --benchmark-only")
print(re.sub(r"[^A-Za-z0-9._-]+", "-", torch.cuda.get_device_name()).strip("-"))
')
fi
date_utc=$(date -u +%Y-%m-%d)
suffix=""
case "$mode" in
    quick) suffix="-quick" ;;
    issue3) suffix="-issue3" ;;
esac
json="bench/results/${device}-${date_utc}${suffix}.json"

test_cmd=()
bench_args=()
case "$mode" in
    full) bench_args=(bench/) ;;
    issue3) bench_args=(bench/bench_linear.py -m issue3) ;;
    quick)
        marker="quick and not compiled_loop"
        [[ "$compiled_loop" == 1 ]] && marker="quick"
        bench_args=(bench/bench_linear.py bench/bench_regularizer.py -m "$marker")
        if [[ "$skip_tests" == 0 ]]; then
            test_cmd=("$python" -m pytest tests -m gpu -p bench.gpu_marker -p bench.quick_autotune -q -rs -p no:cacheprovider)
        fi
        ;;
esac
bench_cmd=("$python" -m pytest "${bench_args[@]}" ${extra[@]+"${extra[@]}"} --benchmark-only --benchmark-json "$json" -rs)
report_cmd=("$python" -m bench.report "$json" --out bench/results)

show() {  # a step's name, then its command shell-quoted (copy-pasteable)
    printf '%s:' "$1"
    shift
    printf ' %q' "$@"
    printf '\n'
}
if [[ "$dry_run" == 1 ]]; then
    if [[ ${#test_cmd[@]} -gt 0 ]]; then show tests "${test_cmd[@]}"; fi
    show bench "${bench_cmd[@]}"
    show report "${report_cmd[@]}"
    exit 0
fi

mkdir -p bench/results
status=0
if [[ ${#test_cmd[@]} -gt 0 ]]; then
    start=$SECONDS
    test_status=0
    "${test_cmd[@]}" || test_status=$?
    echo "GPU tests: pytest exit status $test_status, $((SECONDS - start)) s" >&2
    if [[ "$test_status" == 5 ]]; then
        echo "GPU tests: no test selected by -m gpu (not counted as a failure)" >&2
    elif [[ "$test_status" != 0 ]]; then
        status=$test_status
    fi
fi

start=$SECONDS
bench_status=0
"${bench_cmd[@]}" || bench_status=$?
echo "benchmarks: pytest exit status $bench_status, $((SECONDS - start)) s" >&2
[[ "$status" == 0 ]] && status=$bench_status

if [[ -s "$json" ]]; then
    "${report_cmd[@]}" || echo "the report failed (exit $?); the results are in $json" >&2
else
    echo "no results written to $json" >&2
fi
exit "$status"
