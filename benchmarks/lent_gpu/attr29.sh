#!/usr/bin/env bash
# attr29.sh (run by jobs.sh attr29 from benchmarks/): rank SmolLM2's 90 KV heads by streaming_probe.py --attribute
# over 8k passkey prompts (every head streaming but the one weighed): at depth 1 alone (the answer's own heads:
# on the CPU at cecc29f the top 9 of such a ranking brought the 8k depth-1 answer back) and at depths 0.5 and 1
# (far retrieval too). Probe each top 9 on the untrained model, then convert lolcats with each as its 9 exact
# heads, side by side, and score passkey as long28 did (issue 16: better than calibration's 62.5% at 8k?)
set -e
M=~/smollm2.gguf
top() { grep "greedy 9 as --exact" "$1" | sed 's/.*: //'; }
# greedy: 9 rounds, each making the best head exact and taking the gradient again (on the CPU at bb4ba5b the
# single ranking from every head streaming brought the format back but lost one key's digits)
python streaming_probe.py --model $M --attribute --rounds 9 --lengths 8192 --depths 1 --samples 4 --json ~/res/attr29a.json | tee ~/res/attr29a.out
python streaming_probe.py --model $M --attribute --rounds 9 --lengths 8192 --depths 0.5,1 --samples 4 --json ~/res/attr29b.json | tee ~/res/attr29b.out
A=$(top ~/res/attr29a.out); B=$(top ~/res/attr29b.out)
echo "greedy 9, depth 1: $A; depths 0.5 and 1: $B"
for X in "$A" "$B"; do
  python streaming_probe.py --model $M --exact "$X" --variants streaming --lengths 4096,8192 --depths 0.5,1 --samples 4 --answer 16
done
P="--tasks passkey --lengths 1024,2048,4096,8192 --samples 8 --ood-data none"
python quality.py --model $M --convert linearize --out ~/runs/lolattr29a $P --json ~/res/lolattr29a.json -- \
  --exact-heads "$A" --steps 1000 --eval-tokens 8192 > ~/res/lolattr29a.log 2>&1 &
python quality.py --model $M --convert linearize --out ~/runs/lolattr29b $P --json ~/res/lolattr29b.json -- \
  --exact-heads "$B" --steps 1000 --eval-tokens 8192 > ~/res/lolattr29b.log 2>&1 &
wait
grep -h "passkey" ~/res/lolattr29a.log ~/res/lolattr29b.log | grep -v "miss" || true
