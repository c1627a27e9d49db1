#!/usr/bin/env bash
# Every CLI command end to end on a GPU box (2B architecture, eager engines to keep starts short):
# env --lock, encode, decode --cache (cold, then warm), decode --spot-check, verify, store stats.
# usage: bash benchmarks/gpu_cli_check.sh MODEL_DIR OUT_DIR [IMAGES]
set -euo pipefail
model=$1 out=$2 n=${3:-64}
work=$(mktemp -d)
py=${PYTHON:-python3}
sv() { "$py" -m splitvlm.cli.main "$@"; }
timed() { local name=$1; shift; local t0=$(date +%s.%N); "$@" > "$out/$name.log" 2>&1; local rc=$?;
  echo "$name rc=$rc seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')" | tee -a "$out/cli_check.txt"; tail -3 "$out/$name.log"; }
"$py" - "$work" "$n" <<'PY'
import json, sys
from splitvlm.tools.samples import PROMPTS, save_corpus
work, n = sys.argv[1], int(sys.argv[2])
paths = save_corpus(f"{work}/imgs", n, seed=33)
with open(f"{work}/jobs.jsonl", "w") as f:
    for p in range(2):
        for i, path in enumerate(paths):
            f.write(json.dumps({"id": f"{i}-{p}", "images": [path], "prompt": PROMPTS[p * 2]}, ensure_ascii=False) + "\n")
PY
common=(--model "$model" --store "$work/S" --enforce-eager --no-progress --lock "$out/lock.json")
set +e
timed env sv env --lock "$out/lock.json"
timed encode sv encode "${common[@]}" "$work/imgs"
timed decode_cold sv decode "${common[@]}" --jobs "$work/jobs.jsonl" --out "$out/decode_cold.jsonl" --max-tokens 32 --cache
timed decode_warm sv decode "${common[@]}" --jobs "$work/jobs.jsonl" --out "$out/decode_warm.jsonl" --max-tokens 32 --cache
timed spot_check sv decode "${common[@]}" --jobs "$work/jobs.jsonl" --out "$out/spot.jsonl" --max-tokens 32 --spot-check 0.25
timed verify sv verify "${common[@]}" --jobs "$work/jobs.jsonl" --report "$out/verify_cli.json" --max-tokens 32
timed stats sv store stats --store "$work/S"
"$py" - "$out" <<'PY'
import json, sys
out = sys.argv[1]
cold = [json.loads(l) for l in open(f"{out}/decode_cold.jsonl")]
warm = [json.loads(l) for l in open(f"{out}/decode_warm.jsonl")]
same = all(a["token_ids"] == b["token_ids"] and a["sha256"] == b["sha256"] for a, b in zip(cold, warm))
print(f"cache: {sum(w.get('cached', False) for w in warm)}/{len(warm)} cached, identical to the first run: {same}")
spot = [json.loads(l) for l in open(f"{out}/spot.jsonl")]
checked = [s for s in spot if s.get("spot_checked")]
print(f"spot check: {len(checked)} checked, {sum(s.get('spot_check_identical', False) for s in checked)} identical")
PY
