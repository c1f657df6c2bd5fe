#!/usr/bin/env bash
# The slow result runs in one GPU call: the calibrated tables split into one process per
# model x pattern x criterion, and the dynamic + weight grids of sweeps/papers.yaml, one
# process per model (--tasks none: no lm-eval needed), all in parallel under `timeout`.
# Every process resumes from its store, so calling this again continues where it stopped.
#
#   bash scripts/gpu_tables.sh [SECONDS] [DIR]      (defaults: 560, /tmp/actsparse-results)
#
# Seed DIR with the stores of an earlier call to resume them. Afterwards, here:
#   cat DIR/cal-MODEL-*.jsonl > results/calibrated-MODEL.jsonl     (run keys do not overlap)
#   cp DIR/sweep-MODEL.jsonl results/sweeps/
# With staged models (scripts/device_stage.sh) run it with
#   PYTHONPATH=src:/tmp/actsparse-stage/site ACTSPARSE_CACHE=/tmp/actsparse-cache
set -uo pipefail
cd "$(dirname "$0")/.."
T=${1:-560}
DIR=${2:-/tmp/actsparse-results}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1  # a dozen processes share the CPU cores
mkdir -p "$DIR"
EVAL="--max-tokens 32768 --dtype float32"
for model in smollm2-135m gemma3-270m; do
    for pattern in 2:4 8:16; do
        for criterion in magnitude amber; do
            name=cal-$model-${pattern/:/}-$criterion
            timeout "$T" python3 scripts/calibrated_table.py --model "$model" $EVAL --patterns "$pattern" --criteria "$criterion" \
                --out "$DIR/$name.jsonl" >> "$DIR/$name.log" 2>&1 &
        done
    done
    python3 - "$model" "$DIR" <<'PY'
import sys, yaml
model, out = sys.argv[1], sys.argv[2]
spec = yaml.safe_load(open("sweeps/papers.yaml"))
spec.update(models=[model], grids=spec["grids"][:2], store=f"{out}/sweep-{model}.jsonl")
yaml.safe_dump(spec, open(f"{out}/sweep-{model}.yaml", "w"))
PY
    timeout "$T" python3 -m actsparse.cli.main sweep "$DIR/sweep-$model.yaml" --tasks none --no-progress >> "$DIR/sweep-$model.log" 2>&1 &
done
wait
wc -l "$DIR"/*.jsonl
