#!/usr/bin/env bash
# The slow result runs in one GPU call, as many small jobs in parallel: every cell of the
# calibrated tables (scripts/calibrated_table.py) that DIR's stores do not hold yet, one job per
# model x pattern x criterion x mitigation, and the dynamic + weight grids of
# sweeps/papers.yaml, one job per model x pattern (--tasks none: no lm-eval needed). Jobs start
# longest first, JOBS at a time, and each stops at the common deadline (SECONDS from the start);
# every job appends finished runs to its own store at once, so calling this again with the same
# DIR continues where it stopped.
#
#   bash scripts/gpu_tables.sh [SECONDS] [DIR] [JOBS]      (defaults: 560, /tmp/actsparse-results, 14)
#
# JOBS learned calibrations run at a time, and beside them SIDE_JOBS (default 4) of the rest.
#
# A learned calibration starts only with LEARNED_SECONDS (default 360) left before the deadline,
# since a stopped one keeps nothing; the time left goes to the sweep slices and the quick cells.
#
# Seed DIR with earlier results to resume them: any cal-MODEL-*.jsonl (calibrated-table records)
# and sweep-MODEL.jsonl (sweep records). At the end every model's stores are merged (one record
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

# The job list, longest first: learned calibrations, the sweep slices, statistics-only calibrations.
python3 - "$DIR" > "$DIR/jobs.txt" <<'PY'
import glob, json, sys, yaml
sys.path.insert(0, "scripts")
from calibrated_table import CRITERIA, MITIGATIONS, PATTERNS, key
from actsparse.calibration.mitigations import is_learned
out = sys.argv[1]
spec = yaml.safe_load(open("sweeps/papers.yaml"))
learned, slices, quick = [], [], []
for model in spec["models"]:
    done = {key(json.loads(line)) for path in glob.glob(f"{out}/cal-{model}-*.jsonl") for line in open(path) if line.strip()}
    for p in PATTERNS:
        for c in CRITERIA:
            for m in MITIGATIONS:
                if (p, c, m) not in done:
                    if is_learned(m):
                        learned.append(f"learned {model} {p} {c} {m}")
                    else:
                        quick.append(f"cal {model} {p} {c} {m}")
    grids = spec["grids"][:2]  # the dynamic and the weight grid
    for p in dict.fromkeys(q for g in grids for q in g["patterns"]):
        name = f"sweep-{model}-{p.replace(':', '')}"
        sliced = [dict(g, patterns=[p]) for g in grids if p in g["patterns"]]
        yaml.safe_dump(dict(spec, models=[model], grids=sliced, store=f"{out}/{name}.jsonl"), open(f"{out}/{name}.yaml", "w"))
        slices.append(f"sweep {model} {name}")
print("\n".join(learned + slices + quick))
PY

job() {  # cal MODEL PATTERN CRITERION MITIGATION | sweep MODEL NAME
    local left=$(( DEADLINE - $(date +%s) ))
    (( left > 60 )) || return 0
    if [[ $1 == learned ]]; then  # a learned calibration keeps nothing if it is stopped: start one only with time for it
        (( left > LEARNED_SECONDS )) || return 0
        shift
        set -- cal "$@"
    fi
    if [[ $1 == cal ]]; then
        local name="cal-$2-${3/:/}-$4-$5"
        timeout "$left" python3 scripts/calibrated_table.py --model "$2" --max-tokens 32768 --dtype float32 \
            --patterns "$3" --criteria "$4" --mitigations "$5" --out "$DIR/$name.jsonl" >> "$DIR/$name.log" 2>&1
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
    for kind, pattern, ident in (("calibrated", "cal", key), ("sweep", "sweep", lambda r: r["key"])):
        records = {}
        for path in sorted(glob.glob(f"{out}/{pattern}-{model}*.jsonl")):
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
