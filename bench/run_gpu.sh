#!/usr/bin/env bash
# Run the benchmark suite on a CUDA GPU; write bench/results/<device>-<date>[-quick|-issue3].json,
# its .md report (and .png when matplotlib is installed).
#
#   bash bench/run_gpu.sh                  # whole suite (layers, end-to-end step, regularizer)
#   bash bench/run_gpu.sh --quick          # GPU tests (-m gpu) + every target of issue 33 (-m quick), ≈ 4-7 min on one H100 (bench/README.md counts it)
#   bash bench/run_gpu.sh --quick --compiled-loop   # … plus the torch.compile regularizer baseline (minutes of compiling)
#   bash bench/run_gpu.sh --quick --skip-tests      # the quick benchmarks without the GPU tests
#   bash bench/run_gpu.sh --issue3         # issue 3's benchmark only
#   bash bench/run_gpu.sh --dry-run …      # print the commands, run nothing (works without a GPU)
#   bash bench/run_gpu.sh --quick --budget 540 --out "$OUT"   # each step under `timeout` (tests 2/5
#                                          # of the budget, benchmarks the rest less 30 s for the report);
#                                          # results, report and test XML copied to $OUT
#   bash bench/run_gpu.sh -k "r64"         # anything else is passed to the benchmark's pytest
#
# Needs python3 with torch, triton, transformers, peft and pytest-benchmark.  bitsandbytes and
# matplotlib are optional: without bitsandbytes the qlora/qsorsa benchmarks are skipped with the
# reason; without matplotlib the report is markdown only (bench/README.md says how to add both).
# PYTHON=/path/to/python overrides the interpreter.
#
# The report is written even when some benchmark failed or a step ran out of time (each pytest
# loads bench.on_timeout: SIGTERM ends the session cleanly, so the JSON and XML hold what finished).  Exit status: pytest's — that of the
# first pytest run that failed (GPU tests, then benchmarks), 0 when all passed.  A GPU-test
# step that selects no test (pytest status 5) is reported and not counted as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
mode=full
compiled_loop=0
skip_tests=0
dry_run=0
budget=""
out_dir=""
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) mode=quick ;;
        --issue3) mode=issue3 ;;
        --compiled-loop) compiled_loop=1 ;;
        --skip-tests) skip_tests=1 ;;
        --dry-run) dry_run=1 ;;
        --budget|--out)
            if [[ $# -lt 2 ]]; then echo "$1 needs a value" >&2; exit 2; fi
            if [[ "$1" == --budget ]]; then budget=$2; else out_dir=$2; fi
            shift ;;
        *) extra+=("$1") ;;
    esac
    shift
done
if [[ -n "$budget" ]] && ! [[ "$budget" =~ ^[0-9]+$ && "$budget" -ge 120 ]]; then
    echo "--budget is whole seconds, at least 120 (got '$budget')" >&2
    exit 2
fi
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
stem="bench/results/${device}-${date_utc}${suffix}"
json="$stem.json"

test_cmd=()
bench_args=()
case "$mode" in
    full) bench_args=(bench/) ;;
    issue3) bench_args=(bench/bench_linear.py -m issue3) ;;
    quick)
        marker="quick and not compiled_loop"
        [[ "$compiled_loop" == 1 ]] && marker="quick"
        # Issue 33's targets, most important first (a step cut short keeps what finished).
        bench_args=(bench/bench_linear.py bench/bench_regularizer.py bench/bench_experts.py
                    bench/bench_svd_init.py bench/bench_e2e.py -m "$marker")
        if [[ "$skip_tests" == 0 ]]; then
            test_cmd=("$python" -m pytest tests -m gpu -p bench.gpu_marker -p bench.quick_autotune
                      -p bench.on_timeout -q -rs -p no:cacheprovider --junitxml "$stem-tests.xml")
            # Compiles dominate a cold run and Triton compiles one kernel at a time per process:
            # with pytest-xdist the GPU tests run in SORSA_TEST_WORKERS processes (default 8).
            workers=${SORSA_TEST_WORKERS:-8}
            if [[ "$workers" =~ ^[0-9]+$ && "$workers" -gt 1 ]] && "$python" -c "import xdist" 2>/dev/null; then
                test_cmd+=(-n "$workers")
            fi
        fi
        ;;
esac
bench_cmd=("$python" -m pytest "${bench_args[@]}" ${extra[@]+"${extra[@]}"} --benchmark-only --benchmark-json "$json"
           -rs -p bench.on_timeout --junitxml "$stem-bench.xml")
report_cmd=("$python" -m bench.report "$json" --out bench/results)

show() {  # a step's name, then its command shell-quoted (copy-pasteable)
    printf '%s:' "$1"
    shift
    printf ' %q' "$@"
    printf '\n'
}
# --budget: the GPU tests get 2/5 of it, the benchmarks what is left less REPORT_S for the report.
REPORT_S=30
tests_limit=""
if [[ -n "$budget" && ${#test_cmd[@]} -gt 0 ]]; then tests_limit=$((budget * 2 / 5)); fi
limited() {  # limited SECONDS CMD…: CMD under `timeout` (SIGTERM, then KILL 15 s later); no limit when SECONDS is empty
    local seconds=$1
    shift
    if [[ -z "$seconds" ]]; then "$@"; else timeout -k 15 "$seconds" "$@"; fi
}
if [[ "$dry_run" == 1 ]]; then
    if [[ -n "$budget" ]]; then echo "budget: ${budget} s; tests ${tests_limit:-0} s; report ${REPORT_S} s; benchmarks the rest"; fi
    if [[ ${#test_cmd[@]} -gt 0 ]]; then show tests "${test_cmd[@]}"; fi
    show bench "${bench_cmd[@]}"
    show report "${report_cmd[@]}"
    if [[ -n "$out_dir" ]]; then echo "copy: $stem.json $stem.md $stem.png $stem-tests.xml $stem-bench.xml -> $out_dir"; fi
    exit 0
fi
start_all=$SECONDS

mkdir -p bench/results
status=0
if [[ ${#test_cmd[@]} -gt 0 ]]; then
    start=$SECONDS
    test_status=0
    limited "$tests_limit" "${test_cmd[@]}" || test_status=$?
    [[ "$test_status" == 124 || "$test_status" == 137 ]] && echo "GPU tests: stopped at their ${tests_limit} s limit" >&2
    echo "GPU tests: pytest exit status $test_status, $((SECONDS - start)) s" >&2
    if [[ "$test_status" == 5 ]]; then
        echo "GPU tests: no test selected by -m gpu (not counted as a failure)" >&2
    elif [[ "$test_status" != 0 ]]; then
        status=$test_status
    fi
fi

start=$SECONDS
bench_status=0
bench_limit=""
if [[ -n "$budget" ]]; then
    bench_limit=$((budget - (SECONDS - start_all) - REPORT_S))
    if [[ "$bench_limit" -lt 30 ]]; then bench_limit=30; fi
fi
limited "$bench_limit" "${bench_cmd[@]}" || bench_status=$?
[[ "$bench_status" == 124 || "$bench_status" == 137 ]] && echo "benchmarks: stopped at their ${bench_limit} s limit" >&2
echo "benchmarks: pytest exit status $bench_status, $((SECONDS - start)) s" >&2
[[ "$status" == 0 ]] && status=$bench_status

if [[ -s "$json" ]]; then
    "${report_cmd[@]}" || echo "the report failed (exit $?); the results are in $json" >&2
else
    echo "no results written to $json" >&2
fi
if [[ -n "$out_dir" ]]; then
    mkdir -p "$out_dir"
    for f in "$json" "$stem.md" "$stem.png" "$stem-tests.xml" "$stem-bench.xml"; do
        if [[ -f "$f" ]]; then cp "$f" "$out_dir/"; fi
    done
fi
echo "total: $((SECONDS - start_all)) s" >&2
exit "$status"
