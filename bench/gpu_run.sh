#!/usr/bin/env bash
# Run on a lent GPU machine, from the repository root, after bench/gpu_pack.sh here:
#   device tool: carry [".gpu"], command "bash bench/gpu_run.sh STAGE", timeout_s 600
# Each stage fits one 10-minute call and writes STAGE.log (everything) and STAGE.md (the result) to $OUT.
#   check1    the single-GPU paths, PASS/FAIL each: prepare; train (bf16 autocast, torch.compile, fused
#             AdamW) and its loss falls; SDPA's flash kernel takes GQA; the chunked loss, eager and compiled,
#             equals the plain one (and its times); logits equal Transformers'; eval,
#             decoding through a CUDA graph; sample, serve; fp16 + GradScaler; Muon
#   check2    a run stopped by SIGTERM and resumed follows the uninterrupted one; DDP over NCCL and FSDP2
#             under torchrun (one process: the code path, not the scaling)
#   train     bench/train.py --device cuda --parts speed mfu (vs Transformers; MFU of qwen3-0.6b at 2048)
#   target    bench/train.py --device cuda --parts target (time for `demo` to reach the target val loss)
#   generate  bench/generate.py --device cuda (decode and time to first token vs Transformers; server),
#             then the same single-stream figures for a random qwen3-0.6b
#   paths     for a lease of 15 minutes in all (start included), calls back to back (bench/README.md's runbook):
#   paths2    BUDGET=200 paths (prepare, train with bf16 + compile + fused AdamW, logits, CUDA-graph decoding,
#             serve, eval, sample), then BUDGET=330 paths2 (flash, compiled loss, fp16, Muon, DDP and FSDP2 under
#             torchrun: four compiles), then train with the budget left; generate waits for a later lease.
#             A machine that stops answering returns nothing of its call: short calls lose less
#             (2026-12-05: a single 10-minute call was lost so, and with it the whole lease).
# DEVICE=cpu EXTRA="--batch-size 2 --seq-len 64" runs the check stages here, to try this script itself: there
# each check may take ten times its GPU ceiling, and the trained and resumed runs take STEPS steps (30 on a
# CPU, where a step of `tiny` with the Qwen3 vocabulary takes seconds; 100 on a GPU).
set -uo pipefail
stage=${1:?usage: bash bench/gpu_run.sh check1|check2|train|target|generate|paths|paths2}
OUT=${OUT:-/tmp/nanoqwen-gpu}
# The stage ends itself by then, so that its files come back: counted from the script's start (SECONDS), the
# install and the first import of torch included, as the device call's timeout_s counts them.
deadline=${BUDGET:-100000}
mkdir -p "$OUT"
log="$OUT/$stage.log" result="$OUT/$stage.md"
python3 -m pip install --quiet --no-index --no-deps .gpu/wheels/*.whl >>"$log" 2>&1
export PYTHONPATH=$PWD NANOQWEN_CACHE=$PWD/.gpu/cache PYTHONUNBUFFERED=1 DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then slowdown=10 steps=30; else slowdown=1 steps=100; fi
export STEPS=${STEPS:-$steps}  # bench/gpu_checks.py resume reads it too
# A decode step that fails to capture as a CUDA graph only warns and goes on eagerly: here it fails the check
# (`sample` is then the check of a bfloat16 capture; `decode-cuda-graph` and `serve` check float32's)
export PYTHONWARNINGS="error:decoding without a CUDA graph"
read -ra extra <<<"${EXTRA:-}"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"; } | tee -a "$result"

check() {  # check NAME COMMAND...: one PASS/FAIL line in the result, the output in the log ($limit s at most)
    local name=$1 started=$SECONDS code left=$((deadline - SECONDS - 15)) ceiling=$((${limit:-400} * slowdown))
    shift
    if [ "$left" -lt 15 ]; then echo "SKIP $name (out of time)" | tee -a "$result"; return; fi
    echo "== $name: $*" >>"$log"
    # SIGTERM first (a training run saves and stops after its step), then SIGKILL 10 s on for one that hangs
    timeout -k 10 "$((ceiling < left ? ceiling : left))" "$@" >>"$log" 2>&1
    code=$?
    if [ "$code" -eq 0 ]; then
        echo "PASS $name ($((SECONDS - started)) s)" | tee -a "$result"
    else
        echo "FAIL $name (exit $code; see $stage.log)" | tee -a "$result"
    fi
}

w=$(mktemp -d)
train=(python3 -m nanoqwen train --preset tiny --data "$w/data" --device "$DEVICE" --sample-interval 0 "${extra[@]}")
torchrun=(python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m "${train[@]:2}" --max-steps 20)
prepare() { check prepare python3 -m nanoqwen prepare --dataset shakespeare --tokenizer qwen3 --out "$w/data"; }
tables() { grep -E '^\||^(CPU|NVIDIA|##)' "$log" >>"$result"; }  # the benchmarks' markdown, into the result
# The checks, in groups that both the long (check1, check2) and the short (paths, paths2) stages call; each
# limit is a ceiling for a GPU (times $slowdown), the stage's BUDGET the deadline.
trained_run() {  # a compiled bf16 run, then what its checkpoint must do
    limit=120 check train-bf16-compile-fused "${train[@]}" --max-steps "$STEPS" --eval-interval $((STEPS / 2)) \
        --out "$w/a"
    check loss-falls python3 bench/gpu_checks.py loss-falls "$w/a"
    limit=40 check logits-equal-transformers python3 bench/gpu_checks.py logits "$w/a/best"
    limit=60 check decode-cuda-graph python3 bench/gpu_checks.py cuda-graph "$w/a/best"
    limit=60 check serve python3 bench/gpu_checks.py serve "$w/a/best"
    limit=60 check eval python3 -m nanoqwen eval --model "$w/a/best" --data "$w/data" --device "$DEVICE" \
        --max-windows 32
    limit=60 check sample python3 -m nanoqwen sample --model "$w/a/best" --prompt "ROMEO:" --max-new-tokens 40 \
        --device "$DEVICE"
}
kernels_and_precisions() {
    limit=60 check flash-attention-gqa python3 bench/gpu_checks.py flash
    limit=90 check loss-compiled python3 bench/gpu_checks.py loss
    if [ "$DEVICE" = cpu ]; then  # the 20 steps of this check did not reach their first in 120 s on the 2-core VM
        echo "SKIP fp16-gradscaler (a GPU's path: a CPU's float16 matmuls are emulated, too slow)" | tee -a "$result"
    else
        limit=120 check fp16-gradscaler "${train[@]}" --max-steps 20 --dtype float16 --out "$w/c"
    fi
    limit=120 check muon "${train[@]}" --max-steps 20 --optimizer muon --out "$w/d"
}
torchrun_runs() {
    limit=150 check ddp-nccl-torchrun "${torchrun[@]}" --out "$w/e"
    limit=150 check fsdp2-torchrun "${torchrun[@]}" --fsdp --out "$w/f"
}
resume() { limit=300 check resume-follows-the-full-run python3 bench/gpu_checks.py resume "$w/data" "$w" "${extra[@]}"; }

case $stage in
check1) prepare; trained_run; kernels_and_precisions ;;
check2) prepare; resume; torchrun_runs ;;
paths) prepare; trained_run ;;
paths2) prepare; kernels_and_precisions; torchrun_runs ;;
train) limit=570 check bench-train python3 bench/train.py --device cuda --parts speed mfu ;;
target) limit=570 check bench-target python3 bench/train.py --device cuda --parts target --target-minutes 6 ;;
generate)
    limit=380 check bench-generate python3 bench/generate.py --device cuda --repeats "${REPEATS:-2}" --runs 3
    limit=170 check bench-generate-0.6b python3 bench/generate.py --device cuda --preset qwen3-0.6b --no-server \
        --repeats 2 --runs 2 ;;
*) echo "unknown stage $stage: check1, check2, train, target, generate, paths or paths2" >&2; exit 2 ;;
esac
case $stage in train | target | generate) tables ;; esac
