#!/usr/bin/env bash
# The GPU checks of BENCHMARKS.md ("GPU", "Paper scale: dry run") as prepared runs for a lent
# accelerator machine. CHECKS picks them (default: all three, up to 930 s; one device call may take
# less, so split them):
#
#   device tool:  run(command="CHECKS=speed,mfu bash experiments/gpu_checks.sh", timeout_s=570)
#                 run(command="CHECKS=dryrun bash experiments/gpu_checks.sh", timeout_s=450)
#   anywhere:     OUT=runs/gpu bash experiments/gpu_checks.sh
#
# Uses the machine's own python3 and its JAX (the device image has jax/flax/optax/torch/transformers;
# fedmoe_jax.tools.benchmarks needs nothing else), so no install step. Each check has its own time limit, so
# one hang leaves the others' results. Writes to $OUT (default runs/gpu): log.txt, device.txt and
#   small64.{json,md}  cpu-small dims, cohort 64: vectorized vs sequential_jax (target >= 5x)
#   gpu.{json,md}      switch-base-32 dims in bf16 (the `gpu` preset): vectorized MFU (target >= 35 %)
#                      against a measured 8192^3 bf16 matmul peak, and the device's peak memory
#   paper_dryrun.json  experiments/paper_dryrun.py: Stage 1 and Stage 2 round peak bytes at
#                      switch-base-32 dims from the GPU compiler's memory analysis (80 GB sizing)
# SMALL_PRESET / PAPER_PRESET / ROUNDS override the presets and timed rounds (a CPU smoke test:
# SMALL_PRESET=tiny PAPER_PRESET=tiny ROUNDS=1).
set -u
OUT=${OUT:-runs/gpu}
SMALL_PRESET=${SMALL_PRESET:-cpu-small}
PAPER_PRESET=${PAPER_PRESET:-gpu}
ROUNDS=${ROUNDS:-3}
CHECKS=${CHECKS:-speed,mfu,dryrun}
wants() { case ",$CHECKS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee "$OUT/log.txt") 2>&1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null \
    || echo "no nvidia-smi"
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax',
optax.__version__); print(jax.devices())"
} | tee "$OUT/device.txt"

status=0
if wants speed; then
  echo "== small clients, cohort 64: vectorized vs sequential_jax"
  timeout 240 "$PY" experiments/benchmark.py --preset="$SMALL_PRESET" --cohort=64 \
    --contenders=vectorized,sequential_jax --rounds="$ROUNDS" \
    --out="$OUT/small64.json" --md="$OUT/small64.md" || status=1
fi
if wants mfu; then
  echo "== paper-like dims in bf16: vectorized MFU"
  timeout 270 "$PY" experiments/benchmark.py --preset="$PAPER_PRESET" --contenders=vectorized \
    --rounds="$ROUNDS" --out="$OUT/gpu.json" --md="$OUT/gpu.md" || status=1
fi
if wants dryrun; then
  echo "== paper scale dry run: compiled peak memory of Stage 1 and a Stage 2 round (the GPU compiler's)"
  # needs absl-py and ml_collections (configs/paper.py); compilation only, no weights
  timeout 420 "$PY" experiments/paper_dryrun.py --out="$OUT/paper_dryrun.json" --device_memory_gb=80 \
    && cat "$OUT/paper_dryrun.json" || status=1
fi
cat "$OUT"/*.md 2>/dev/null
exit $status
