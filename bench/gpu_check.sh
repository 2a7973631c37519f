#!/usr/bin/env bash
# One prepared GPU check (at most ~6 minutes on one H200): the input path and whole training
# steps of every architecture, fp32 and bf16, on real batches and on synthetic tensors.
#
#   bash bench/gpu_check.sh [DATA_DIR]        # DATA_DIR holds train/<class>/ (default: device_data)
#
# No network and no ../shared on the device machine: DATA_DIR travels with the checkout
# (device_data/ is git-ignored; make it here with the command in bench/README or the report:
#   python -c "import sys; sys.path.insert(0,'tests'); from conftest import extract_subset;
#              extract_subset('device_data', per_class=12, max_side=400)"   # ~1,200 images, <50 MB
# ). Everything is printed and also written to $OUT/gpu_check.txt ($OUT: the folder the run
# tool brings back; ./gpu_check_out when unset). A failing step prints FAILED and the rest go on.
set -u
cd "$(dirname "$0")/.."   # the repository root: DATA and OUT may be relative to it
DATA="${1:-device_data}"
OUT="${OUT:-gpu_check_out}"
SECONDS_EACH="${SECONDS_EACH:-3}"     # measured seconds per benchmark (after the warm-up)
BUDGET_S="${BUDGET_S:-330}"           # start no new benchmark after this many seconds
DEVICE="${DEVICE:-cuda}"              # DEVICE=cpu BATCH=4 SECONDS_EACH=0.5: a smoke run without a GPU
BATCH="${BATCH:-64}"                  # images per batch / training step
WORKERS="${WORKERS:-8}"               # loader processes for the real-batch runs
CACHE="$(mktemp -d /tmp/gpu_check_cache.XXXXXX)"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.txt"
: > "$LOG"

say() { echo "$@" | tee -a "$LOG"; }
run() {   # run LIMIT_S CMD...: one benchmark, time-limited, its output to stdout and the log
    local limit=$1; shift
    if [ "$SECONDS" -ge "$BUDGET_S" ]; then say "SKIPPED (over ${BUDGET_S} s): $*"; return; fi
    say "### $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || say "FAILED (exit $rc)"
    say "### took $((SECONDS - t0)) s"
}

if [ ! -d "$DATA/train" ]; then
    say "error: no $DATA/train folder (pass the data folder as \$1)"; exit 2
fi
say "gpu_check $(date -u +%FT%TZ) data=$DATA images=$(find "$DATA/train" -type f | wc -l)"
nvidia-smi -L 2>&1 | tee -a "$LOG"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
           torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$LOG"

# input path alone: ours (uint8 cache on the GPU, batched augmentation) vs the original on CPU workers
for recipe in resnet efficientnet_b4; do
    run 75 python bench/bench_data.py --data "$DATA" --recipe "$recipe" --device "$DEVICE" --batch-size "$BATCH" \
        --workers "$WORKERS" --seconds "$SECONDS_EACH" --warmup 4 --cache-dir "$CACHE" \
        --compare --repeats 1
done

# whole training steps: each architecture at its main script's --unfreeze default
declare -A UNFREEZE=([resnet18]=last:1 [resnet50]=last:1 [resnet101]=last:2
                     [efficientnet_b4]=last:6 [efficientnet_lite0]=last:3)
for arch in resnet18 resnet50 resnet101 efficientnet_b4 efficientnet_lite0; do
    for precision in bf16 fp32; do
        run 45 python bench/bench_train.py --arch "$arch" --unfreeze "${UNFREEZE[$arch]}" \
            --precision "$precision" --device "$DEVICE" --batch-size "$BATCH" --seconds "$SECONDS_EACH" --warmup 2 --synthetic
        run 60 python bench/bench_train.py --arch "$arch" --unfreeze "${UNFREEZE[$arch]}" \
            --precision "$precision" --device "$DEVICE" --batch-size "$BATCH" --seconds "$SECONDS_EACH" --warmup 2 \
            --data "$DATA" --workers "$WORKERS" --cache-dir "$CACHE"
    done
done
rm -rf "$CACHE"
say "gpu_check done in $SECONDS s; summary:"
grep -E "^### python|^images_per_s=|^speedup|^original_images_per_s=|^FAILED|^SKIPPED" "$LOG" \
    | sed 's/^### python bench\///' > "$OUT/gpu_check_summary.txt"
cat "$OUT/gpu_check_summary.txt"
