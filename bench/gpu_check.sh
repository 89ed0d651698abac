#!/usr/bin/env bash
# One prepared check for a lent GPU machine (H100/H200): install carried wheels, install trd_fast in place, run
# the tests (time-capped), the engine on CUDA, then the GPU benchmarks (bench/run_gpu.py: first the fused linear
# rows, bf16 N=8192 V=151936 H=4096 against TRL's ChunkedDivergenceFunction and Liger's LigerFusedLinearJSD, then
# the logits matrix). Rows of a baseline that does not import are recorded as skipped with the reason. The GPU image
# has neither TRL nor Liger: carry their wheels in .whl/ (git-ignored), fetched where pip works with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any \
#     -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
# Run from anywhere in the repo:
#
#   OUT=/some/dir bash bench/gpu_check.sh
#
# Files written to $OUT (at most 8, the device tool's limit): build.log, tests.log, engine.log (with the last
# metrics of each run), torchrun.log, engine-cuda.json (bench/engine_step.py on CUDA), bench.log, summary.md,
# gpu-<device>.json (the last two also kept in bench/results/). Run folders go to $GPU_CHECK_WORK
# (default /tmp/trd_fast_gpu_work). The whole script aims at under 9.5 minutes on an H100/H200 (give the call 600 s):
#   GPU_CHECK_BUDGET_S  total budget in seconds (default 540); benchmark rows that would start after it are
#                       recorded as skipped, so the JSON and summary.md are always written
#   GPU_CHECK_TEST_S    cap on tests/test_triton_gpu.py (default 280 s)
#   GPU_CHECK_WHOLE_SUITE=1  also build trd_fast._C and run the CPU suite under the image's torch (time allowing)
#   GPU_CHECK_SKIP_TESTS=1  benchmarks only (a rerun)
#   GPU_CHECK_ONLY=TEXT     benchmark only the cases whose label contains TEXT (e.g. "bfloat16")
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/trd_fast_gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/trd_fast_gpu_work}
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK"/engine-*                       # a rerun on a warm machine starts its runs afresh
touch "$WORK/stamp"                           # results newer than this are this run's
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
TEST_CAP=${GPU_CHECK_TEST_S:-280}
BENCH_MIN=90      # seconds always left to the benchmarks
ENGINE_S=180      # seconds kept for the engine runs (3b-3d) when capping the tests
HARD=$(( BUDGET + 45 ))  # nothing runs past this (the call's limit is 600 s)
start=$SECONDS
left() { echo $(( BUDGET - (SECONDS - start) )); }
within() {  # within N -> N seconds, or fewer so as to end by HARD (at least 1)
  local most=$(( HARD - (SECONDS - start) ))
  [ "$1" -lt "$most" ] && most=$1
  echo $(( most < 1 ? 1 : most ))
}
say() { echo "[gpu_check $(( SECONDS - start ))s] $*"; }
fresh() { find "$@" -newer "$WORK/stamp" 2>/dev/null || true; }  # those of the given files this run wrote
build_status="not installed"
test_status="not run"
bench_rc="not run"
finish() {  # on any exit: summary.md and this run's JSON, even when a step failed or was killed
  if [ ! -f "$OUT/summary.md" ]; then
    for f in $(fresh bench/results/gpu-*.json); do cp "$f" "$OUT"/; done
    printf '# trd_fast GPU check\n\nbenchmarks did not finish (rc %s); see bench.log\n\nbuild: %s\n\ntests: %s\n' \
      "$bench_rc" "$build_status" "$test_status" > "$OUT/summary.md"
  fi
}
trap finish EXIT

say "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo unknown)"
# The image's own packages serve: trd_fast supports its torch 2.11, triton 3.6 and transformers 5.17 (pyproject.toml's
# ranges; an unsupported version fails at import with one ImportError naming it), so no transformers wheel is carried.
say "stack: $($PY -c 'import importlib.metadata as m, importlib.util as u; print(", ".join(f"{p} {m.version(p)}"
  for p in ("torch", "triton", "transformers", "numpy", "peft") if u.find_spec(p)))' 2>&1 | tail -1)"

# 1. carried wheels (TRL, Liger and what TRL needs beyond the image) into a private site dir
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    || say "installing the carried wheels FAILED: the TRL and Liger rows will say why they are skipped"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  say "carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
else
  say "no .whl/ folder: the TRL and Liger rows will be skipped"
fi

# 2. install in place. CUDA tensors run the Triton kernels, so the C++ CPU extension is built only for the whole CPU
# suite (GPU_CHECK_WHOLE_SUITE=1): on the H200 its build took about 2 of the run's 7 minutes.
if [ "${GPU_CHECK_WHOLE_SUITE:-0}" = "1" ] \
    && $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  build_status="built with trd_fast._C"
elif TRD_FAST_SKIP_EXT=1 $PY -m pip install --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1; then
  build_status="installed without trd_fast._C (TRD_FAST_SKIP_EXT=1: the GPU paths do not use it)"
  [ "${GPU_CHECK_WHOLE_SUITE:-0}" = "1" ] && build_status="extension build FAILED (see build.log); $build_status"
else
  build_status="install FAILED (see build.log)"
  say "$build_status"; tail -30 "$OUT/build.log"; exit 1
fi
say "build: $build_status"

# 3. tests, capped so the engine runs and the benchmarks keep their time. tests/conftest.py defaults TRITON_INTERPRET
# to 1 (the CPU suite runs Triton through the interpreter); tests/test_triton_gpu.py needs it unset and is
# self-contained, so it runs on its own without the conftest: every test, one line each, with short tracebacks (on
# the H200 the file took about 4 minutes, most of it compiling). With GPU_CHECK_WHOLE_SUITE=1 the whole CPU suite
# follows with what is left (torch 2.11 there). The GPU image has no TRL: the integration tests (TRL is a test
# dependency on CPU) are left out there when it cannot be imported. The whole suite also leaves out the interpreted
# Triton tests (-k "not triton"): triton 3.6's interpreter fails under numpy >= 2.4 (the image has 2.5); CI runs them
# with the newest triton, and the GPU file tests the compiled kernels.
run_tests() {  # run_tests CAP LABEL ARGS... -> appends to tests.log; sets rc and from (tests.log's first new line)
  local cap=$1 label=$2; shift 2
  from=$(( $(wc -l < "$OUT/tests.log") + 1 ))
  echo "=== $label (cap ${cap}s): pytest $*" | tee -a "$OUT/tests.log"
  set +e
  timeout -k 5 "$cap" "$@" 2>&1 | tee -a "$OUT/tests.log"
  rc=${PIPESTATUS[0]}
  set -e
}
describe_tests() {  # describe_tests RC CAP SECONDS -> one line on the run that run_tests last logged
  local log last
  log=$(tail -n +"$from" "$OUT/tests.log")
  last=$(grep -E "[0-9]+ (passed|failed|skipped|error)|no tests ran" <<< "$log" | tail -1 || true)
  if [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; then
    echo "TIMED OUT after ${2}s: $(grep -c " PASSED" <<< "$log" || true) passed, $(grep -c " FAILED" <<< "$log" \
      || true) failed before the cap (-v runs; a -q run says only: ${last:-no summary line})"
  else echo "rc $1 in ${3}s: ${last:-no summary line}"; fi
}
test_status="skipped (GPU_CHECK_SKIP_TESTS=1)"
: > "$OUT/tests.log"
if [ "${GPU_CHECK_SKIP_TESTS:-0}" != "1" ]; then
  cap=$(( $(left) - BENCH_MIN - ENGINE_S ))
  [ "$cap" -gt "$TEST_CAP" ] && cap=$TEST_CAP
  [ "$cap" -lt 30 ] && cap=30
  t0=$SECONDS
  run_tests "$(within "$cap")" "GPU tests" env -u TRITON_INTERPRET $PY -m pytest -v --tb=short -rfE \
    tests/test_triton_gpu.py --noconftest -p no:cacheprovider
  test_status="GPU file: $(describe_tests "$rc" "$cap" $(( SECONDS - t0 )))"
  if [ "${GPU_CHECK_WHOLE_SUITE:-0}" = "1" ]; then
    rest=$(( $(left) - BENCH_MIN - ENGINE_S ))
    if [ "$rest" -ge 15 ]; then
      t1=$SECONDS
      no_trl=()
      $PY -c "import trl" 2>/dev/null || no_trl=(--ignore=tests/test_integration_trl.py
        --ignore=tests/test_integration_hf.py --ignore=tests/test_integration_trl_distillation.py
        --ignore=tests/test_bench_gpu_smoke.py)
      run_tests "$(within "$rest")" "whole suite" $PY -m pytest -q tests -x -p no:cacheprovider -k "not triton" \
        "${no_trl[@]}"
      test_status="$test_status; whole suite (CPU, no interpreted Triton): $(describe_tests "$rc" "$rest" \
        $(( SECONDS - t1 )))"
    else
      test_status="$test_status; whole suite not run (budget spent)"
    fi
  fi
  say "tests: $test_status"
fi

engine_ready() { $PY -c "import yaml, matplotlib, tqdm" 2>/dev/null; }

# 3b. the TRD engine on CUDA: three trd_splice steps and three trd steps on the shipped task (engine.log)
engine_status="not run (needs pyyaml and matplotlib in the image)"
if engine_ready; then
  set +e
  for mode in trd_splice trd; do
    timeout -k 5 "$(within 60)" $PY -m trd_fast.cli train --config configs/chain-trd.yaml --set model.device=cuda \
      --set distill.mode=$mode --set optim.steps=3 --set run.progress=false --set run.eval_every=3 \
      --set run.output_dir="$WORK/engine-$mode" >> "$OUT/engine.log" 2>&1
    engine_rc=$?
    echo "--- $mode: last metrics" >> "$OUT/engine.log"
    tail -n 2 "$WORK/engine-$mode/metrics.jsonl" >> "$OUT/engine.log" 2>/dev/null
    [ "$engine_rc" -ne 0 ] && break
  done
  set -e
  engine_status="rc $engine_rc (engine.log ends each run with its last metrics)"
fi
say "engine: $engine_status"
test_status="$test_status; engine on CUDA: $engine_status"

# 3c. the engine under torchrun on one GPU: nccl, an FSDP2 student (bf16 parameters, fp32 gradient reduction), two
# trd steps with a sharded checkpoint after each and the final student gathered into a model directory
torchrun_status="not run (needs pyyaml and matplotlib in the image)"
if engine_ready; then
  set +e
  timeout -k 5 "$(within 90)" $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m trd_fast.cli train \
    --config configs/chain-trd.yaml --set model.device=cuda --set distill.mode=trd --set optim.steps=2 \
    --set run.progress=false --set run.eval_every=0 --set run.checkpoint_every=1 \
    --set run.output_dir="$WORK/engine-torchrun" > "$OUT/torchrun.log" 2>&1
  torchrun_rc=$?
  ls -R "$WORK/engine-torchrun" >> "$OUT/torchrun.log" 2>&1
  set -e
  torchrun_status="rc $torchrun_rc (torchrun.log ends with the run folder's listing)"
fi
say "torchrun, 1 GPU: $torchrun_status"
test_status="$test_status; torchrun on 1 GPU: $torchrun_status"

# 3d. one training step of each mode on CUDA (bench/engine_step.py): teacher forwards, draft acceptance, step times
# against opd, and the rewrite's split into the teacher model's forwards and the host's work -> engine-cuda.json
step_status="not run (needs pyyaml and matplotlib in the image)"
if engine_ready; then
  set +e
  timeout -k 5 "$(within 120)" $PY -m bench.engine_step --device cuda --repeats 3 --forward-batches 4 \
    >> "$OUT/engine.log" 2>&1
  step_rc=$?
  set -e
  for f in $(fresh bench/results/engine-cuda.json); do cp "$f" "$OUT"/; done
  step_status="rc $step_rc (engine-cuda.json when it finished)"
fi
say "engine step bench: $step_status"
test_status="$test_status; engine step bench on CUDA: $step_status"

# 4. benchmarks: rows that would start past the budget are recorded as skipped
budget=$(( $(left) - 15 ))
[ "$budget" -lt 30 ] && budget=30
say "benchmarks (budget ${budget}s)"
set +e
timeout -k 5 "$(within $(( budget + 60 )))" $PY -m bench.run_gpu --budget-s "$budget" --out-dir "$OUT" \
  --tests "build: $build_status; tests: $test_status" ${GPU_CHECK_ONLY:+--only "$GPU_CHECK_ONLY"} 2>&1 \
  | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
set -e
finish
say "done in $(( SECONDS - start ))s (benchmarks rc $bench_rc)"
cat "$OUT/summary.md"
