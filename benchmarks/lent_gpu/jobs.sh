#!/usr/bin/env bash
# jobs.sh PHASE : the measured commands (run from benchmarks/ via launch.sh)
M=~/smollm2.gguf
L=$REPO/benchmarks/lent_gpu/launch.sh
EV="--tasks ppl,passkey,mqar --ppl-lengths 1024,8192 --lengths 1024,2048,4096,8192 --samples 6"
case $1 in
smoke)  # GPU-only paths, tiny: mixed exact heads (both attentions), loza
  S="--tasks passkey,mqar --lengths 2048 --samples 1 --mqar-pairs 8 --ood-data none"
  $L s-xliz "python quality.py --model $M --convert linearize --out ~/runs/s-xliz $S -- --attention lizard --exact-heads 3 --steps 10 --eval-tokens 2048"
  $L s-xlol "python quality.py --model $M --convert linearize --out ~/runs/s-xlol $S -- --exact-heads 3 --steps 10 --eval-tokens 2048"
  $L s-loza "python quality.py --model $M --convert sparsify --out ~/runs/s-loza $S -- --method loza --steps 6 --eval-tokens 8192"
  ;;
smokegen)
  $L s-gen "python generation.py --model $M --methods ~/runs/s-xliz,~/runs/s-xlol,~/runs/s-loza --lengths 2048 --new-tokens 8 --repeats 1"
  ;;
prof)   # alone on the GPU: per-layer and whole-model timing, prefill/decode of untrained conversions
  $L prof "python profile_layer.py --model $M --lengths 4096,32768 --repeats 5 --json ~/res/prof.json"
  ;;
alone)  # one conversion alone, the default recipe
  $L alone "python quality.py --model $M --convert linearize --out ~/runs/lolcats --tasks none --json ~/res/alone.json -- --steps 1000"
  ;;
batch)  # issue 16: exact heads and loza, side by side
  $L xliz3 "python quality.py --model $M --convert linearize --out ~/runs/lizard-x3 $EV --json ~/res/xliz3.json -- --attention lizard --exact-heads 3 --steps 1000 --eval-tokens 8192"
  $L xliz6 "python quality.py --model $M --convert linearize --out ~/runs/lizard-x6 $EV --json ~/res/xliz6.json -- --attention lizard --exact-heads 6 --steps 1000 --eval-tokens 8192"
  $L xliz9 "python quality.py --model $M --convert linearize --out ~/runs/lizard-x9 $EV --json ~/res/xliz9.json -- --attention lizard --exact-heads 9 --steps 1000 --eval-tokens 8192"
  $L xlol9 "python quality.py --model $M --convert linearize --out ~/runs/lolcats-x9 $EV --json ~/res/xlol9.json -- --exact-heads 9 --steps 1000 --eval-tokens 8192"
  $L loza "python quality.py --model $M --convert sparsify --out ~/runs/loza $EV --json ~/res/loza.json -- --method loza --fraction 0.5 --steps 1000 --eval-tokens 16384"
  ;;
chain)  # everything, one after the other, detached: batch; then gen, alone and prof, each alone on the GPU
  mkdir -p ~/res
  setsid nohup bash -c "bash $REPO/benchmarks/lent_gpu/jobs.sh batch; bash $REPO/benchmarks/lent_gpu/wait.sh xliz3 xliz6 xliz9 xlol9 loza;
    for p in gen alone prof; do bash $REPO/benchmarks/lent_gpu/jobs.sh \$p; bash $REPO/benchmarks/lent_gpu/wait.sh \$(bash $REPO/benchmarks/lent_gpu/jobs.sh names-\$p); done
    echo done > ~/res/chain.rc" > ~/res/chain.log 2>&1 &
  echo "chain launched"
  ;;
names-gen) echo gen2 ;;
names-alone) echo alone ;;
names-prof) echo prof ;;
short)  # issue 16 in one call (~9 min): exact heads 9 for both attentions and loza, fewer steps than batch
  $L xliz9 "python quality.py --model $M --convert linearize --out ~/runs/lizard-x9 $EV --json ~/res/xliz9.json -- --attention lizard --exact-heads 9 --steps 500 --eval-tokens 8192"
  $L xlol9 "python quality.py --model $M --convert linearize --out ~/runs/lolcats-x9 $EV --json ~/res/xlol9.json -- --exact-heads 9 --steps 500 --eval-tokens 8192"
  $L loza "python quality.py --model $M --convert sparsify --out ~/runs/loza $EV --json ~/res/loza.json -- --method loza --fraction 0.5 --steps 200 --eval-tokens 16384"
  ;;
gen8)   # alone, after short: decode/prefill/cache of its conversions beside the teacher
  $L gen8 "python generation.py --model $M --methods teacher,lolcats,lizard,~/runs/lizard-x9,~/runs/lolcats-x9,~/runs/loza --lengths 2048,8192,32768 --repeats 3 --json ~/res/gen8.json"
  ;;
gen)    # alone: decode/prefill/cache of the trained conversions beside the teacher
  $L gen2 "python generation.py --model $M --methods teacher,lolcats,lizard,~/runs/lizard-x3,~/runs/lizard-x6,~/runs/lizard-x9,~/runs/lolcats-x9,~/runs/loza --lengths 2048,8192,32768 --repeats 3 --json ~/res/gen2.json"
  ;;
esac
