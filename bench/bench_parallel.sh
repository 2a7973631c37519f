#!/usr/bin/env bash
# One four-trial grid with successive halving, run in one process and then in N processes
# (torchrun, --parallel trials), on the same data: wall seconds of each, and their ratio.
#
#   bash bench/bench_parallel.sh DATA [N] [extra options for main_ResNet-18.py]
#   ORDER=many-first bash bench/bench_parallel.sh ...   # the N processes first (load drift shows up)
#
# On the CPU each of the N processes gets cores/N threads (OMP_NUM_THREADS is left to torchrun);
# the one process gets every core, so fp32 sums may round differently: the script says whether
# the two halving.json agree. Figures and their dates go in docs/PERFORMANCE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash bench/bench_parallel.sh DATA [N] [options]}
N=${2:-2}
shift $(( $# >= 2 ? 2 : 1 ))
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
ARGS=(--data "$DATA" --weights none --img-size 64 --limit-per-class 12 --workers 0 --device cpu
      --precision fp32 --grid-spec "lr=1e-3,3e-4;batch_size=16,32" --halving 1 --epochs 2 "$@")

one() { python main_ResNet-18.py "${ARGS[@]}" --out "$OUT/one" > "$OUT/one.log" 2>&1; }
many() { python -m torch.distributed.run --standalone --nproc_per_node "$N" main_ResNet-18.py "${ARGS[@]}" \
             --out "$OUT/many" > "$OUT/many.log" 2>&1; }
timed() { local t=$(date +%s.%N); "$1"; python -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" \
              "$t" "$(date +%s.%N)"; }
if [ "${ORDER:-one-first}" = many-first ]; then T_MANY=$(timed many); T_ONE=$(timed one)
else T_ONE=$(timed one); T_MANY=$(timed many); fi

python - "$OUT" "$T_ONE" "$T_MANY" "$N" <<'EOF'
import json, sys
out, one, many, n = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
cuts = [json.load(open(f"{out}/{d}/main_ResNet-18/grid/halving.json"))["scores"] for d in ("one", "many")]
print(f"one process: {one:.1f} s; {n} processes (--parallel trials): {many:.1f} s; ratio {one / many:.2f}; "
      f"same halving scores: {cuts[0] == cuts[1]}")
EOF
