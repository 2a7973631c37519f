#!/usr/bin/env bash
# One prepared device check, under 8 minutes on one H200. First the product: a short real run of
# every main_*.py (data, training, validation, checkpoints, frozen prefix, TensorBoard, the test
# pass), ResNet-18 in fp16 and in fp32, torchrun, a run killed after epoch 1 and resumed. Then the
# benches: the input path, and whole training steps in bf16 and fp32 on real and synthetic batches.
#
#   bash bench/gpu_check.sh [DATA_DIR]            # DATA_DIR holds train/<class>/ and test/<class>/ (default: device_data)
#   DEVICE=cpu bash bench/gpu_check.sh DATA_DIR   # the same steps shrunk to check the script itself on a CPU:
#                                                 # 32 px, 4 images per class, batch 4, 1 epoch, no loader processes
#
# No network and no ../shared on the device machine: DATA_DIR travels with the checkout
# (device_data/ is git-ignored; make it here with
#   python -c "import sys; sys.path.insert(0,'tests'); from conftest import extract_subset;
#              extract_subset('device_data', per_class=12, max_side=400)"   # ~1,200 images, <50 MB
# ). Offline, torchvision's ImageNet weights cannot be fetched: such an architecture trains from
# --weights none unless its weights file is already in the torch hub cache. Lite0's weights come
# with its pip package.
#
# Everything is printed and also written to $OUT/gpu_check.txt ($OUT: the folder the run tool
# brings back; ./gpu_check_out when unset). Runs, checkpoints and caches go to a temporary folder,
# removed at the end. The summary comes last, also in $OUT/gpu_check_summary.txt: one PASSED,
# FAILED or SKIPPED line per step, and NOTE lines; this script prints the word FAILED nowhere else. Exit status 1
# when a step failed. No step starts after BUDGET_S seconds, and a running one is cut off then.
set -u
cd "$(dirname "$0")/.."   # the repository root: DATA and OUT may be relative to it
DATA="${1:-device_data}"
OUT="${OUT:-gpu_check_out}"
DEVICE="${DEVICE:-cuda}"
BUDGET_S="${BUDGET_S:-450}"
if [ "$DEVICE" = cpu ]; then
    SHRINK=(--img-size 32 --limit-per-class 4 --batch-size 4 --workers 0)
    EPOCHS=1; SECONDS_EACH="${SECONDS_EACH:-0.2}"; WARMUP=1; BATCH="${BATCH:-4}"; WORKERS="${WORKERS:-0}"; LIMIT_S=120
    # One thread per process: tiny tensors gain nothing from more, and on a small shared machine
    # spinning OpenMP threads only slow each step down.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
    SHRINK=()
    EPOCHS=2; SECONDS_EACH="${SECONDS_EACH:-2}"; WARMUP=2; BATCH="${BATCH:-64}"; WORKERS="${WORKERS:-8}"; LIMIT_S=150
fi
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
CACHE="$WORK/cache"
RUNS="$WORK/runs"
mkdir -p "$OUT" "$CACHE" "$RUNS"
LOG="$OUT/gpu_check.txt"
: > "$LOG"
RESULTS=()

say() { echo "$@" | tee -a "$LOG"; }
record() { RESULTS+=("$(printf '%-8s %s' "$1" "$2")"); }   # record PASSED|FAILED|SKIPPED|NOTE "name (detail)"
why() { if [ "$RC" -eq 124 ]; then echo "timed out after $TOOK s"; else echo "exit $RC after $TOOK s"; fi; }
over_budget() { [ $((BUDGET_S - SECONDS)) -lt "${1:-10}" ] && record SKIPPED "$2 (over the $BUDGET_S s budget)"; }

# step NAME LIMIT_S CMD...: CMD's output to the screen, the log and $WORK/NAME.log; sets RC and TOOK.
# Past the budget it runs nothing and sets RC=-1.
step() {
    local name=$1 limit=$2; shift 2
    RC=-1 TOOK=0
    over_budget 10 "$name" && return
    local left=$((BUDGET_S - SECONDS)) t0=$SECONDS
    [ "$limit" -le "$left" ] || limit=$left
    say "### $name: $*"
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG" "$WORK/$name.log"
    RC=${PIPESTATUS[0]} TOOK=$((SECONDS - t0))
    say "### $name: exit $RC after $TOOK s"
}

# check NAME METRICS [DETAIL]: PASSED when the step exited 0 and wrote METRICS (a metrics.json)
check() {
    local name=$1 metrics=$2 detail=${3:-}
    [ "$RC" -ge 0 ] || return
    if [ "$RC" -eq 0 ] && [ -f "$metrics" ]; then
        record PASSED "$name ($TOOK s, test top-1 $(grep -o '"test_top1": [0-9.]*' "$metrics" | awk '{printf "%.1f", $2}')%$detail)"
    elif [ "$RC" -eq 0 ]; then
        record FAILED "$name (exit 0, but no $metrics)"
    else
        record FAILED "$name ($(why); last line: $(tail -n 1 "$WORK/$name.log"))"
    fi
}

# train NAME SCRIPT ARGS...: one short real run of a main_*.py
train() {
    local name=$1 script=$2; shift 2
    step "$name" "$LIMIT_S" python "$script" "${TRAIN[@]}" --epochs "$EPOCHS" --name "$name" "$@"
    check "$name" "$RUNS/${script%.py}/$name/metrics.json"
}

if [ ! -d "$DATA/train" ] || [ ! -d "$DATA/test" ]; then
    say "error: no $DATA/train or $DATA/test folder (pass the data folder as \$1)"; exit 2
fi
say "gpu_check $(date -u +%FT%TZ) DEVICE=$DEVICE data=$DATA images=$(find "$DATA/train" "$DATA/test" -type f | wc -l)"
if command -v nvidia-smi > /dev/null; then nvidia-smi -L 2>&1 | tee -a "$LOG"; fi
# One interpreter prints the versions and GPU, and which ImageNet weights the hub cache holds.
declare -A WEIGHTS=()
while read -r key value; do
    case "$key" in weights:*) WEIGHTS[${key#weights:}]=$value ;; *) say "$key $value" ;; esac
done < <(python - 2>&1 <<'EOF'
import os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
try:
    from study.nets import ARCHS
    for name, arch in ARCHS.items():
        if arch.weights is not None:  # torchvision's; Lite0's come with its pip package
            cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(arch.weights.url))
            print(f"weights:{name}", "imagenet" if os.path.isfile(cached) else "none")
except Exception as e:  # the training steps below say what is broken
    print("note: cannot read the architectures from study/nets.py:", type(e).__name__, e)
EOF
)
for arch in resnet18 resnet50 resnet101 efficientnet_b4; do
    : "${WEIGHTS[$arch]:=none}"
    say "$arch: --weights ${WEIGHTS[$arch]}$([ "${WEIGHTS[$arch]}" = none ] && echo ' (its ImageNet weights are not in the torch hub cache)')"
done

# ----------------------------------------------------------------------------- the product
TRAIN=(--data "$DATA" --out "$RUNS" --cache-dir "$CACHE" --precision auto --device "$DEVICE" "${SHRINK[@]}")
declare -A SCRIPT=([resnet18]=main_ResNet-18.py [resnet50]=main_ResNet-50.py [resnet101]=main_ResNet-101.py
                   [efficientnet_b4]=main_Efficient_B4.py)
for arch in resnet18 resnet50 resnet101 efficientnet_b4; do
    train "train-$arch" "${SCRIPT[$arch]}" --weights "${WEIGHTS[$arch]}"
done
train train-efficientnet_lite0 main_EfficientNet_Lite0.py
# --augment seed: the augmentation renderer stays in these runs (tuned's random-init recipe only mirrors)
R18=(--weights "${WEIGHTS[resnet18]}" --augment seed)
train resnet18-fp16 main_ResNet-18.py "${R18[@]}" --precision fp16   # fp16 autocast runs on the CPU too
train resnet18-fp32 main_ResNet-18.py "${R18[@]}" --precision fp32

# One process under torchrun; the code picks the backend (nccl on a GPU, gloo on the CPU).
if command -v torchrun > /dev/null; then TORCHRUN=(torchrun); else TORCHRUN=(python -m torch.distributed.run); fi
step torchrun-resnet18 "$LIMIT_S" "${TORCHRUN[@]}" --standalone --nproc_per_node=1 main_ResNet-18.py \
    "${TRAIN[@]}" --epochs "$EPOCHS" "${R18[@]}" --name torchrun-resnet18
metrics="$RUNS/main_ResNet-18/torchrun-resnet18/metrics.json"
check torchrun-resnet18 "$metrics" ", $(grep -o '"processes": [0-9]*' "$metrics" 2> /dev/null | tr -d '"')"

# SIGKILL from the outside as soon as last.pth shows up (the end of epoch 1 of 3), then the same
# command with --resume auto: it must train epochs 2 and 3 only and write metrics.json.
kill_resume() {
    local name=kill-resume-resnet18 dir="$RUNS/main_ResNet-18/kill-resume-resnet18" t0=$SECONDS
    local cmd=(python main_ResNet-18.py "${TRAIN[@]}" "${R18[@]}" --epochs 3 --name kill-resume-resnet18)
    over_budget "$LIMIT_S" "$name" && return
    say "### $name, killed once $dir/last.pth exists: ${cmd[*]}"
    "${cmd[@]}" > "$WORK/killed.log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2> /dev/null && [ ! -f "$dir/last.pth" ] && [ $((SECONDS - t0)) -lt "$LIMIT_S" ]; do
        sleep 0.05
    done
    kill -9 "$pid" 2> /dev/null
    wait "$pid" 2> /dev/null
    tee -a "$LOG" < "$WORK/killed.log"
    if [ ! -f "$dir/last.pth" ] || [ -f "$dir/metrics.json" ]; then
        if [ -f "$dir/metrics.json" ]; then record FAILED "$name (the run finished before the kill)"
        else record FAILED "$name (no last.pth before the run ended; last line: $(tail -n 1 "$WORK/killed.log"))"; fi
        return
    fi
    say "killed (SIGKILL) after $dir/last.pth showed up"
    step "$name" "$LIMIT_S" "${cmd[@]}" --resume auto
    [ "$RC" -ge 0 ] || return
    local epochs
    epochs=$(grep -oE '^epoch [0-9]+/' "$WORK/$name.log" | tr -dc '0-9\n' | tr '\n' ' ')
    if [ "$RC" -eq 0 ] && [ "$epochs" != "2 3 " ]; then
        RC=1; record FAILED "$name (the resumed run trained epochs '${epochs% }', expected '2 3')"
    else
        check "$name" "$dir/metrics.json" ", resumed after epoch 1"
    fi
}
kill_resume

# Two processes on one GPU in --parallel trials mode: a four-trial grid with successive halving,
# each trial trained whole by one process (on the CPU: gloo, one thread per process). PASSED when
# the grid ends with four trials in results.csv and its halving.json.
trials_grid() {
    local name=torchrun-trials-grid dir="$RUNS/main_ResNet-18/trials-grid" rows
    if ! python main_ResNet-18.py --help 2> /dev/null | grep -q -- '--parallel'; then
        record FAILED "$name (main_ResNet-18.py has no --parallel option)"; return
    fi
    step "$name" "$LIMIT_S" "${TORCHRUN[@]}" --standalone --nproc_per_node 2 main_ResNet-18.py "${TRAIN[@]}" \
        "${R18[@]}" --grid-spec "lr=1e-3,3e-4;batch_size=8,16" --halving 1 --epochs 2 --parallel trials --name trials-grid
    [ "$RC" -ge 0 ] || return
    rows=$(($(cat "$dir/results.csv" 2> /dev/null | wc -l) - 1))
    if [ "$RC" -eq 0 ] && [ "$rows" -eq 4 ] && [ -f "$dir/halving.json" ]; then
        record PASSED "$name ($TOOK s, 4 trials on 2 processes, halving from 1 epoch)"
    elif [ "$RC" -eq 0 ]; then
        record FAILED "$name (exit 0, but $((rows < 0 ? 0 : rows)) trials in results.csv$([ -f "$dir/halving.json" ] || echo ', no halving.json'))"
    else
        record FAILED "$name ($(why); last line: $(tail -n 1 "$WORK/$name.log"))"
    fi
}
trials_grid

# ----------------------------------------------------------------------------- the benches
# bench NAME LIMIT_S CMD...: PASSED with the bench's figures (images_per_s=N, speedup...=R)
bench() {
    local name=$1; shift
    step "$name" "$@"
    [ "$RC" -ge 0 ] || return
    if [ "$RC" -eq 0 ]; then
        record PASSED "$name ($(grep -E '^([a-z_]*images_per_s|speedup[a-z_]*)=' "$WORK/$name.log" | tr '\n' ' ')$TOOK s)"
    else
        record FAILED "$name ($(why))"
    fi
}
# the input path alone: ours (uint8 cache on the GPU, batched augmentation) vs the original on CPU workers
for seed_policy in resnet efficientnet_b4; do
    bench "bench-data-$seed_policy" 75 python bench/bench_data.py --data "$DATA" --seed-policy "$seed_policy" --device "$DEVICE" \
        --batch-size "$BATCH" --workers "$WORKERS" --seconds "$SECONDS_EACH" --warmup $((2 * WARMUP)) --cache-dir "$CACHE" \
        --compare --repeats 1
done
# Stream synchronisations per training batch of each input path (bench/sync_check.py): on CUDA
# counted under torch.cuda.set_sync_debug_mode("warn"), the target being 0; on the CPU, the calls
# that would synchronise on CUDA. PASSED with the figure when it is 0.
sync_size=()
[ "$DEVICE" != cpu ] || sync_size=(--img-size 32)
step sync-check 90 python bench/sync_check.py --data "$DATA" --device "$DEVICE" --batch-size "$BATCH" \
    --workers "$WORKERS" --limit-per-class 4 --cache-dir "$CACHE" "${sync_size[@]}"
if [ "$RC" -ge 0 ]; then
    figure=$(grep -E '^(syncs|blocking_calls)_per_batch=' "$WORK/sync-check.log" | tail -n 1)
    if [ "$RC" -eq 0 ]; then record PASSED "sync-check ($figure$([ "$DEVICE" != cpu ] || echo ' (cpu: calls that would sync on CUDA)'), $TOOK s)"
    else record FAILED "sync-check (${figure:-$(why)}; where: the lines under each path in the log)"; fi
fi
# whole training steps, each architecture at its main script's --unfreeze default. On the CPU one
# run per architecture, the four precision/input pairs taken in turn: each bench import costs
# seconds there, and its figures mean nothing.
declare -A UNFREEZE=([resnet18]=last:1 [resnet50]=last:1 [resnet101]=last:2
                     [efficientnet_b4]=last:6 [efficientnet_lite0]=last:5)
PAIRS=(bf16:synthetic bf16:data fp32:synthetic fp32:data)
BENCH_SIZE=()
[ "$DEVICE" != cpu ] || BENCH_SIZE=(--img-size 32)
i=0 left_out=0
for arch in resnet18 resnet50 resnet101 efficientnet_b4 efficientnet_lite0; do
    for pair in "${PAIRS[@]}"; do
        if [ "$DEVICE" = cpu ] && [ "$pair" != "${PAIRS[$((i % 4))]}" ]; then left_out=$((left_out + 1)); continue; fi
        precision=${pair%:*} input=${pair#*:}
        args=(--arch "$arch" --unfreeze "${UNFREEZE[$arch]}" --precision "$precision" --device "$DEVICE"
              --batch-size "$BATCH" --seconds "$SECONDS_EACH" --warmup "$WARMUP" "${BENCH_SIZE[@]}")
        if [ "$input" = synthetic ]; then
            bench "bench-train-$arch-$precision-synthetic" 45 python bench/bench_train.py "${args[@]}" --synthetic
        else
            bench "bench-train-$arch-$precision-data" 60 python bench/bench_train.py "${args[@]}" \
                --data "$DATA" --workers "$WORKERS" --cache-dir "$CACHE"
        fi
    done
    i=$((i + 1))
done
# the CPU mode runs one case per architecture by design, so that it fits a test: a note, not a skip
[ "$left_out" -eq 0 ] || record NOTE "bench-train: cpu mode runs one case per architecture ($left_out more on a GPU)"

# ----------------------------------------------------------------------------- summary
printf '%s\n' "gpu_check summary: DEVICE=$DEVICE, $SECONDS s" "${RESULTS[@]}" > "$OUT/gpu_check_summary.txt"
tee -a "$LOG" < "$OUT/gpu_check_summary.txt"
! grep -q '^FAILED' "$OUT/gpu_check_summary.txt"
