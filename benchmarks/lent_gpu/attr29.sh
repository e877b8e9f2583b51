#!/usr/bin/env bash
# attr29.sh (run by jobs.sh attr29 from benchmarks/): rank SmolLM2's 90 KV heads by streaming_probe.py --attribute
# over 8k passkey prompts (depths 0.5 and 1, every head streaming but the one weighed), check the top 9 on the
# untrained model with the probe, then convert lolcats with exactly those 9 heads exact and score passkey as
# long28 did (issue 16: do the heads the 8k answer leans on do better than calibration's?)
set -e
M=~/smollm2.gguf
python streaming_probe.py --model $M --attribute --lengths 8192 --depths 0.5,1 --samples 4 --json ~/res/attr29.json | tee ~/res/attr29.out
X=$(grep "top 9 as --exact" ~/res/attr29.out | sed 's/.*: //')
echo "top 9: $X"
python streaming_probe.py --model $M --exact "$X" --lengths 4096,8192 --depths 0.5,1 --samples 4 --answer 16
python quality.py --model $M --convert linearize --out ~/runs/lolattr29 --tasks passkey --lengths 1024,2048,4096,8192 \
  --samples 8 --ood-data none --json ~/res/lolattr29.json -- --exact-heads "$X" --steps 1000 --eval-tokens 8192
