#!/usr/bin/env bash
# fast94/fast96 recipe variants measured side by side, one bench process per GPU (issue 7's table of what
# helped). Each argument is one GPU's space-separated list of variants, run in that order after one compile
# warm-up per preset and batch size (see cudacnn.train.fast.bench):
#   run(command='bash scripts/gpu_fast_variants.sh "fast94@5 fast94:epochs=7.5@5" "fast96@5"',
#       carry=[".data"], kind="nvidia-h200-x4", timeout_s=600)
# Logs and JSON lines in $OUT/fast<GPU>.{log,jsonl}; all tables printed at the end.
set -uo pipefail
OUT=${OUT:-/tmp/fast-variants-out}
DATA=${DATA:-.data/cifar10-jpeg.tar.gz}
BUDGET_S=${BUDGET_S:-480}   # no bench starts a new run after this many seconds
mkdir -p "$OUT"
export PYTHONPATH=src
python3 -c "from cudacnn.data import load_dataset; load_dataset('$DATA', quiet=True)" || exit 1  # decode once
gpu=0; pids=()
for group in "$@"; do
  args=(); for v in $group; do args+=(--variant "$v"); done
  CUDA_VISIBLE_DEVICES=$gpu python3 -m cudacnn.train.fast.bench --data "$DATA" --budget-s "$BUDGET_S" \
    --json "$OUT/fast$gpu.jsonl" "${args[@]}" > "$OUT/fast$gpu.log" 2>&1 &
  pids+=($!)
  gpu=$((gpu + 1))
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
for ((i = 0; i < gpu; i++)); do
  echo "== GPU $i"; grep -E "^(NVIDIA|data ready|fast9[46] warm-up)|^variant|^fast9[46].* runs|^fast9[46] .*[0-9] +[0-9]" "$OUT/fast$i.log" | tail -n 12
  grep -iE "error|warn|skipping cudagraphs|recompil" "$OUT/fast$i.log" | sort | uniq -c | head -5
done
exit "$failed"  # the number of bench processes that failed (not the last grep's status)
