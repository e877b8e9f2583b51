#!/usr/bin/env bash
# Compare recipe variants of `convert linearize` side by side on one GPU (the 135M model leaves the
# GPU mostly idle, so concurrent runs cost little). Each variant's report lands in $OUT/<name>.json.
# Usage: STEPS=500 bash benchmarks/gpu_variants.sh "name:flags" "name:flags" ...
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
gguf=${GGUF:-/root/smollm2.gguf}
export PYTHONUNBUFFERED=1
pids=()
for spec in "$@"; do
  name=${spec%%:*}
  flags=${spec#*:}
  # shellcheck disable=SC2086
  python3 -m attnswap.cli linearize --model "$gguf" --steps "${STEPS:-500}" --out "/tmp/v-$name" --overwrite \
    --json "$out/$name.json" $flags > "$out/$name.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
python3 - "$out" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    t, c = r["teacher"]["ppl"], r["converted"]["ppl"]
    print(f"{f.stem:12s} teacher {t:.3f} converted {c:.3f} ratio {c / t:.4f} train {r['train_seconds']:.0f}s losses {r['final_losses']}")
PY
