#!/usr/bin/env bash
# The slow result runs in one GPU call, as many small jobs in parallel: every cell of the
# calibrated tables (scripts/calibrated_table.py) that DIR's stores do not hold yet, one job per
# model x pattern x criterion x mitigation; the dynamic + weight grids of sweeps/papers.yaml, one
# job per model x pattern; and the runs of its calibrated grid, one job per run, the table's cells
# left out (all with --tasks none: no lm-eval needed). Jobs start
# longest first, JOBS at a time, and each stops at the common deadline (SECONDS from the start);
# every job appends finished runs to its own store at once, so calling this again with the same
# DIR continues where it stopped.
#
#   bash scripts/gpu_tables.sh [SECONDS] [DIR] [JOBS]      (defaults: 560, /tmp/actsparse-results, 14)
#
# JOBS learned calibrations run at a time, and beside them SIDE_JOBS (default 4) of the rest.
# MODELS="smollm2-135m ..." limits the jobs to those models (default: the sweep's). GRIDS="FILE ..."
# names the sweep files whose calibrated grids are run (default: sweeps/papers.yaml; also
# sweeps/papers-extended.yaml for the rest of the cross product), in that order.
#
# A learned calibration starts only with LEARNED_SECONDS (default 360) left before the deadline,
# since a stopped one keeps nothing; the time left goes to the sweep slices and the quick cells.
#
# Seed DIR with earlier results to resume them: any cal-MODEL-*.jsonl (calibrated-table records)
# and sweep-MODEL.jsonl (sweep records; its dense record also seeds every grid job's store). At the end every model's stores are merged (one record
# per run) into DIR/merged/calibrated-MODEL.jsonl and DIR/merged/sweep-MODEL.jsonl, ready to copy
# to results/ and results/sweeps/.
# With staged models (scripts/device_stage.sh) run it with
#   PYTHONPATH=src:/tmp/actsparse-stage/site ACTSPARSE_CACHE=/tmp/actsparse-cache
set -uo pipefail
cd "$(dirname "$0")/.."
T=${1:-560}
DIR=${2:-/tmp/actsparse-results}
JOBS=${3:-14}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1  # a dozen processes share the CPU cores
export DEADLINE=$(( $(date +%s) + T )) LEARNED_SECONDS=${LEARNED_SECONDS:-360}
mkdir -p "$DIR"

# The job list, longest first: learned calibrations (table cells, then runs of the calibrated
# grid), the sweep slices, statistics-only calibrations (table cells, then grid runs).
python3 - "$DIR" > "$DIR/jobs.txt" <<'PY'
import glob, json, os, sys, yaml
sys.path.insert(0, "scripts")
from calibrated_table import CRITERIA, MITIGATIONS, PATTERNS, key
from actsparse.calibration.mitigations import is_learned
from actsparse.sweep.spec import parse_sweep
out = sys.argv[1]
spec = yaml.safe_load(open("sweeps/papers.yaml"))
learned, slices, quick, grid_learned, grid_quick = [], [], [], [], []
models = os.environ.get("MODELS", "").split() or spec["models"]
for model in models:
    done = {key(json.loads(line)) for path in glob.glob(f"{out}/cal-{model}-*.jsonl") for line in open(path) if line.strip()}
    for p in PATTERNS:
        for c in CRITERIA:
            for m in MITIGATIONS:
                if (p, c, m) not in done:
                    if is_learned(m):
                        learned.append(f"learned {model} {p} {c} {m}")
                    else:
                        quick.append(f"cal {model} {p} {c} {m}")
    records = [json.loads(line) for path in glob.glob(f"{out}/sweep-{model}*.jsonl") + glob.glob(f"{out}/grid-{model}-*.jsonl")
               for line in open(path) if line.strip()]
    have = {r["key"] for r in records}
    dense = next((r for r in records if r.get("target") == "dense"), None)
    grids = spec["grids"][:2]  # the dynamic and the weight grid, one slice per pattern (unless done)
    for p in dict.fromkeys(q for g in grids for q in g["patterns"]):
        name = f"sweep-{model}-{p.replace(':', '')}"
        sliced = dict(spec, models=[model], grids=[dict(g, patterns=[p]) for g in grids if p in g["patterns"]])
        if all(run.key in have for run in parse_sweep(sliced).with_tasks(()).runs):
            continue
        yaml.safe_dump(dict(sliced, store=f"{out}/{name}.jsonl"), open(f"{out}/{name}.yaml", "w"))
        slices.append(f"sweep {model} {name}")
    # The calibrated grids, one run per job (its store seeded with the model's dense record).
    for path in os.environ.get("GRIDS", "sweeps/papers.yaml").split():
        source = yaml.safe_load(open(path))
        cells = [(g, p, c, m) for g in source["grids"] if "calibration" in g
                 for p in g["patterns"] for c in g["criteria"] for m in g["mitigations"]]
        for g, p, c, m in cells:
            if (p, c, m) in done:
                continue  # a table cell: already measured (scripts/calibrated_table.py)
            one = dict(source, models=[model], grids=[dict(g, patterns=[p], criteria=[c], mitigations=[m])])
            if parse_sweep(one).with_tasks(()).runs[-1].key in have:
                continue
            name = f"grid-{model}-{p.replace(':', '')}-{c}-{m}"
            yaml.safe_dump(dict(one, store=f"{out}/{name}.jsonl"), open(f"{out}/{name}.yaml", "w"))
            if dense is not None and not glob.glob(f"{out}/{name}.jsonl"):
                open(f"{out}/{name}.jsonl", "w").write(json.dumps(dense) + "\n")
            if is_learned(m):
                grid_learned.append(f"learned {model} {name}")
            else:
                grid_quick.append(f"grid {model} {name}")
print("\n".join(learned + grid_learned + slices + quick + grid_quick))
PY

job() {  # cal MODEL PATTERN CRITERION MITIGATION | sweep MODEL NAME | grid MODEL NAME | learned (cal or grid arguments)
    local left=$(( DEADLINE - $(date +%s) ))
    (( left > 60 )) || return 0
    if [[ $1 == learned ]]; then  # a learned calibration keeps nothing if it is stopped: start one only with time for it
        (( left > LEARNED_SECONDS )) || return 0
        shift
        if [[ $2 == grid-* ]]; then set -- grid "$@"; else set -- cal "$@"; fi
    fi
    if [[ $1 == cal ]]; then
        local name="cal-$2-${3/:/}-$4-$5"
        timeout "$left" python3 scripts/calibrated_table.py --model "$2" --max-tokens 32768 --dtype float32 \
            --patterns "$3" --criteria "$4" --mitigations "$5" --out "$DIR/$name.jsonl" >> "$DIR/$name.log" 2>&1
    elif [[ $1 == grid ]]; then
        timeout "$left" python3 -m actsparse.cli.main sweep "$DIR/$3.yaml" --tasks none --no-progress >> "$DIR/$3.log" 2>&1
    else
        [[ -f $DIR/$3.jsonl || ! -f $DIR/sweep-$2.jsonl ]] || cp "$DIR/sweep-$2.jsonl" "$DIR/$3.jsonl"  # resume from earlier runs
        timeout "$left" python3 -m actsparse.cli.main sweep "$DIR/$3.yaml" --tasks none --no-progress >> "$DIR/$3.log" 2>&1
    fi
    echo "$(date +%T) done: $*"
}
export -f job
export DIR
# Learned calibrations in one pool of JOBS, everything else beside it in a pool of SIDE_JOBS.
grep '^learned' "$DIR/jobs.txt" | xargs -r -P "$JOBS" -L 1 bash -c 'job "$@"' _ &
grep -v '^learned' "$DIR/jobs.txt" | xargs -r -P "${SIDE_JOBS:-4}" -L 1 bash -c 'job "$@"' _
wait

python3 - "$DIR" <<'PY'
import glob, json, os, sys, yaml
sys.path.insert(0, "scripts")
from calibrated_table import key
out = sys.argv[1]
os.makedirs(f"{out}/merged", exist_ok=True)
for model in yaml.safe_load(open("sweeps/papers.yaml"))["models"]:
    for kind, patterns, ident in (("calibrated", ["cal"], key), ("sweep", ["sweep", "grid"], lambda r: r["key"])):
        records = {}
        for path in sorted(p for pattern in patterns for p in glob.glob(f"{out}/{pattern}-{model}*.jsonl")):
            for line in open(path):
                if line.strip():
                    record = json.loads(line)
                    records.setdefault(ident(record), record)
        with open(f"{out}/merged/{kind}-{model}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records.values())
        print(f"{kind}-{model}: {len(records)} records")
PY
# PACK=FILE: also pack every store, log and the merged stores into one archive (a transfer back
# from a lent machine brings only a few files).
if [[ -n ${PACK:-} ]]; then
    (cd "$DIR" && tar czf "$PACK.tmp" --exclude '*.yaml' --exclude '*.md' . && mv "$PACK.tmp" "$PACK")
fi
