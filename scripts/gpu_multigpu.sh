#!/usr/bin/env bash
# Several GPUs, measured on a 2- or 4-GPU H200 machine (nvidia-h200-x2 / -x4), in one call:
#   1. ResNet-18 (CIFAR stem, preset resnet18-cifar) for EPOCHS epochs on 1, 2 and 4 GPUs (as many as the
#      machine has): training throughput (median images/s over epochs 2..E) and test accuracy of each, so the
#      speed-up comes with an accuracy check at the same number of steps. One such set per entry of R18_SETS
#      (global batch sizes, each optionally followed by ":compile", ":graphs" (CUDA graphs) and/or ":lr=X";
#      default "1024 1024:graphs").
#   2. 8 seeded fast94 runs one after another on one GPU vs spread over 4 GPUs (`--runs 8 --gpus 4`), after
#      one untimed run that fills the compile and data caches both commands then read. Reported: whole-command
#      wall time, and each process's runs alone (its first run's start to its last run's end, after its compile
#      warm-up, from the wall-clock stamps each run writes) with the slowest process bounding the sweep.
# Run from the repository root with the data carried:  run(command="bash scripts/gpu_multigpu.sh",
#   carry=[".data"], kind="nvidia-h200-x4", timeout_s=600). Results: $OUT/summary.{md,json}, logs, runs.
# Measured 2026-11-21 on 4 H200: about 30 s per eager ResNet-18 run of 8-10 epochs, 3.5 min for the whole
# default script without the compiled set (benchmarks/multigpu.md); a compiled set adds its compile time per run.
set -uo pipefail
OUT=${OUT:-/tmp/multigpu-out}
DATA=${DATA:-.data/cifar10-jpeg.tar.gz}
CACHE=${CACHE:-/tmp/cudacnn-cache}
EPOCHS=${EPOCHS:-10}
R18_SETS=${R18_SETS:-"1024 1024:graphs"}   # global batch sizes, each optionally with ":compile", ":graphs", ":lr=X"
FAST_RUNS=${FAST_RUNS:-8}
mkdir -p "$OUT/logs"
export PYTHONPATH=src
# NVLink multicast stays off on these shared machines (the launcher sets these too; belt and braces).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NGPU=$(nvidia-smi -L | wc -l)
{
  date -u +%FT%TZ; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())"
  nvidia-smi topo -m
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" | head -8

# Decode the JPEG set once, so no timed run pays for it.
python3 -c "from cudacnn.data import load_dataset; d = load_dataset('$DATA', cache_dir='$CACHE', quiet=True); print(d.name, len(d.train), len(d.test))" \
  > "$OUT/logs/decode.log" 2>&1 || { echo "decode failed"; tail "$OUT/logs/decode.log"; exit 1; }

now() { date +%s.%N; }
declare -A WALL
for SET in $R18_SETS; do
  B=${SET%%:*}; FLAGS=""; TAG="b$B"
  for OPT in $(echo "${SET#"$B"}" | tr ':' ' '); do   # after the batch size: compile, lr=X
    case "$OPT" in
      compile) FLAGS+=" --compile"; TAG+="-compile" ;;
      graphs) FLAGS+=" --compile --compile-mode reduce-overhead"; TAG+="-graphs" ;;
      lr=*) FLAGS+=" --lr ${OPT#lr=}"; TAG+="-lr${OPT#lr=}" ;;
      *) echo "unknown option '$OPT' in R18_SETS (known: compile, graphs, lr=X)" >&2; exit 2 ;;
    esac
  done
  for G in 1 2 4; do
    [ "$G" -le "$NGPU" ] || continue
    t0=$(now)
    NCCL_DEBUG=INFO timeout 300 python3 -m cudacnn train --preset resnet18-cifar --epochs "$EPOCHS" --batch-size "$B" \
      $FLAGS --gpus "$G" --data "$DATA" --cache-dir "$CACHE" --out "$OUT/runs" --name "r18-$TAG-g$G" --quiet \
      > "$OUT/logs/r18-$TAG-g$G.log" 2>&1 || echo "r18 $TAG on $G GPU(s) failed: see logs/r18-$TAG-g$G.log"
    WALL[r18-$TAG-g$G]=$(python3 -c "print($(now) - $t0)")
  done
  grep -h -m2 "via P2P\|via SHM\|Channel 00.*via" "$OUT/logs/r18-$TAG-g2.log" 2>/dev/null | head -2
done

S=$(( NGPU < 4 ? NGPU : 4 ))
[ "$FAST_RUNS" -gt 0 ] && {
timeout 200 python3 -m cudacnn train --preset fast94 --runs 1 --data "$DATA" --cache-dir "$CACHE" --out "$OUT/runs" \
  --name fast94-warmup --quiet > "$OUT/logs/fast94-warmup.log" 2>&1 || echo "fast94 warm-up failed"
t0=$(now)
timeout 300 python3 -m cudacnn train --preset fast94 --runs "$FAST_RUNS" --gpus 1 --data "$DATA" --cache-dir "$CACHE" \
  --out "$OUT/runs" --name fast94-seq --quiet > "$OUT/logs/fast94-seq.log" 2>&1 || echo "fast94 sequential failed"
WALL[fast94-seq]=$(python3 -c "print($(now) - $t0)")
t0=$(now)
timeout 300 python3 -m cudacnn train --preset fast94 --runs "$FAST_RUNS" --gpus "$S" --data "$DATA" --cache-dir "$CACHE" \
  --out "$OUT/runs" --name "fast94-g$S" --quiet > "$OUT/logs/fast94-g$S.log" 2>&1 || echo "fast94 sweep failed"
WALL[fast94-g$S]=$(python3 -c "print($(now) - $t0)")
}

WALLS=""; for k in "${!WALL[@]}"; do WALLS+="$k=${WALL[$k]} "; done
python3 - "$OUT" "$S" "$WALLS" <<'EOF'
import json, statistics, sys
from pathlib import Path
out, sweep_gpus, walls = Path(sys.argv[1]), int(sys.argv[2]), dict(w.split("=") for w in sys.argv[3].split())
runs, rows, result = out / "runs", [], {"walls_s": {k: float(v) for k, v in walls.items()}}
lines = ["| ResNet-18 (CIFAR stem) | GPUs | images/s (median, epochs 2..E) | speed-up | test acc (TTA) | wall s |",
         "|---|---:|---:|---:|---:|---:|"]
for tag in sorted({p.name.rsplit("-g", 1)[0][4:] for p in runs.glob("r18-*-g*")}):
    base = None
    for g in (1, 2, 4):
        run = runs / f"r18-{tag}-g{g}"
        if not (run / "eval.json").exists():
            continue
        hist = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        ips = statistics.median(r["images_per_s"] for r in hist[1:] or hist)
        acc = json.loads((run / "eval.json").read_text())["accuracy"]
        base = base or ips
        rows.append({"setting": tag, "gpus": g, "images_per_s": ips, "speedup": ips / base, "test_acc": acc,
                     "epochs": len(hist)})
        lines.append(f"| resnet18-cifar {tag} | {g} | {ips:,.0f} | {ips / base:.2f}x | {acc:.4f} | "
                     f"{float(walls.get(f'r18-{tag}-g{g}', 0)):.0f} |")
result["resnet18"] = rows
seq, par = runs / "fast94-seq" / "results.json", runs / f"fast94-g{sweep_gpus}" / "results.json"
if seq.exists() and par.exists():
    s, p = json.loads(seq.read_text()), json.loads(par.read_text())
    ws, wp = float(walls["fast94-seq"]), float(walls[f"fast94-g{sweep_gpus}"])
    pacc = [r["test_acc"] for r in p["runs"] if r.get("test_acc") is not None]
    result["fast94"] = {"sequential_wall_s": ws, "sweep_wall_s": wp, "speedup": ws / wp, "sweep_gpus": sweep_gpus,
                        "seq_acc_mean": s["acc_mean"], "sweep_acc_mean": statistics.fmean(pacc), "sweep_runs": len(pacc),
                        "seq_train_time_sum_s": sum(r["train_time_s"] for r in s["rows"])}
    def phases(folder):  # per process: (compile warm-up s, first run's start to last run's end s)
        records = [json.loads(f.read_text()) for f in [folder / "results.json", *folder.glob("*/results.json")]
                   if f.exists()]
        return [(r["warmup_s"], max(x["finished"] for x in r["rows"]) - min(x["started"] for x in r["rows"]))
                for r in records if "warmup_s" in r]  # the sweep's own results.json has no warm-up
    seq_ph, par_ph = phases(runs / "fast94-seq"), phases(runs / f"fast94-g{sweep_gpus}")
    ps, pp = max(p[1] for p in seq_ph), max(p[1] for p in par_ph)  # the slowest process bounds the phase
    result["fast94"].update(sequential_phases=seq_ph, sweep_phases=par_ph, sequential_run_phase_s=ps,
                            sweep_run_phase_s=pp, run_phase_speedup=ps / pp)
    f = result["fast94"]
    lines += ["", "| fast94 x8 | wall s (whole command) | speed-up | runs alone s (slowest process) | speed-up | "
              "compile warm-up s per process | accuracy mean |", "|---|---:|---:|---:|---:|---|---:|",
              f"| one after another, 1 GPU | {ws:.1f} | 1.00x | {ps:.1f} | 1.00x | {seq_ph[0][0]:.1f} | "
              f"{f['seq_acc_mean']:.4f} |",
              f"| spread over {sweep_gpus} GPUs | {wp:.1f} | {ws / wp:.2f}x | {pp:.1f} | {ps / pp:.2f}x | "
              f"{', '.join(f'{w:.1f}' for w, _ in par_ph)} | {f['sweep_acc_mean']:.4f} ({len(pacc)} runs) |"]
(out / "summary.json").write_text(json.dumps(result, indent=2))
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
