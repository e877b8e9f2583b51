#!/usr/bin/env bash
# jobs.sh PHASE : the measured commands (run from benchmarks/ via launch.sh)
M=~/smollm2.gguf
L=$REPO/benchmarks/lent_gpu/launch.sh
J="bash $REPO/benchmarks/lent_gpu/jobs.sh"; W="bash $REPO/benchmarks/lent_gpu/wait.sh"  # phases inside detached chains
EV="--tasks ppl,passkey,mqar --ppl-lengths 1024,2048,8192 --lengths 1024,2048,4096,8192 --samples 6"
# q NAME COMMAND OUTDIR EVAL_TOKENS 'FLAGS' : a conversion of M, then its quality suite ($EV), as job NAME
q() { $L $1 "python quality.py --model $M --convert $2 --out ~/runs/$3 $EV --json ~/res/$1.json -- $5 --eval-tokens $4"; }
# g NAME METHODS : the generation suite over METHODS (teacher, methods, saved runs) at 2k / 8k / 32k, as job NAME
g() { $L $1 "python generation.py --model $M --methods $2 --lengths 2048,8192,32768 --repeats 3 --json ~/res/$1.json"; }
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
batch|short)  # issue 16, side by side: batch as the issue asks (1000 steps), short sized to one call (~9 min)
  [ $1 = batch ] && { x=1000; z=1000; } || { x=500; z=200; }
  [ $1 = batch ] && for n in 3 6; do
    q xliz$n linearize lizard-x$n 8192 "--attention lizard --exact-heads $n --steps $x"; done
  q xliz9 linearize lizard-x9 8192 "--attention lizard --exact-heads 9 --steps $x"
  q xlol9 linearize lolcats-x9 8192 "--exact-heads 9 --steps $x"
  q loza sparsify loza 16384 "--method loza --fraction 0.5 --steps $z"
  ;;
chain)  # everything, one after the other, detached: batch; then gen, alone and prof, each alone on the GPU
  mkdir -p ~/res
  setsid nohup bash -c "$J batch; $W xliz3 xliz6 xliz9 xlol9 loza; $J gen; $W gen2; $J alone; $W alone; $J prof; $W prof
    echo done > ~/res/chain.rc" > ~/res/chain.log 2>&1 &
  echo "chain launched"
  ;;
wave)   # detached: one conversion alone (issue 17's timing), the profiler alone, then b14 and b16 side by side
  mkdir -p ~/res
  setsid nohup bash -c "$J alone; $W alone; $J prof2; $W prof2; $J b14; $J b16; echo done > ~/res/wave.rc" > ~/res/wave.log 2>&1 &
  : > ~/res/alone.log; echo "wave launched"
  ;;
prof2)  # alone: per-layer and whole-model timing with prefill into a cache; traces of the prefill
  $L prof2 "python profile_layer.py --model $M --lengths 2048,8192,32768 --repeats 5 --trace --trace-dir ~/res/traces --json ~/res/prof2.json"
  ;;
b14)    # issue 14: linearize on longer training rows (the same 8,192 tokens a step); gqa --train all
  q lol4k linearize lolcats-4k 8192 "--seq-len 4096 --batch-size 2 --steps 1000"
  q liz4k linearize lizard-4k 8192 "--attention lizard --seq-len 4096 --batch-size 2 --steps 1000"
  q gqaall gqa gqa-all 8192 "--kv-heads 1 --train all --steps 1000"
  q gqaall4k gqa gqa-all-4k 8192 "--kv-heads 1 --train all --seq-len 4096 --batch-size 2 --steps 1000"
  ;;
b16)    # issue 16: exact heads with retrieval rows in every training stage, 1000 steps
  q xliz9r linearize lizard-x9r 8192 "--attention lizard --exact-heads 9 --retrieval-mix 0.25 --steps 1000"
  q xlol9r linearize lolcats-x9r 8192 "--exact-heads 9 --retrieval-mix 0.25 --steps 1000"
  ;;
next)   # detached, for the next session: the prefill re-timed after 4cf01f9 (alone), then issue 16's open rows
  mkdir -p ~/res
  setsid nohup bash -c "$J prof2; $W prof2; $J b16long; echo done > ~/res/next.rc" > ~/res/next.log 2>&1 &
  : > ~/res/prof2.log; echo "next launched"
  ;;
b16long)  # issue 16: exact heads (9 lizard and lolcats, 3 / 6 lizard) trained on rows of 4,096 (facts that far back; retrieval rows by default)
  q xliz9l linearize lizard-x9l 8192 "--attention lizard --exact-heads 9 --seq-len 4096 --batch-size 2 --steps 1000"
  q xlol9l linearize lolcats-x9l 8192 "--exact-heads 9 --seq-len 4096 --batch-size 2 --steps 1000"
  for n in 3 6; do q xliz$n linearize lizard-x$n 8192 "--attention lizard --exact-heads $n --seq-len 4096 --batch-size 2 --steps 1000"; done
  ;;
third)  # detached: the prefill re-timed after the fused feature maps (alone), issue 16's open rows side by side,
        # then the compiled decode step of the trained models (alone)
  mkdir -p ~/res
  setsid nohup bash -c "$J prof2; $W prof2; $J b16long; $W xliz9l xlol9l xliz3 xliz6; $J genc; echo done > ~/res/third.rc" > ~/res/third.log 2>&1 &
  : > ~/res/prof2.log; echo "third launched"
  ;;
kerneltests)  # foreground, bf16 on the GPU: this wave's kernels and the model on both backends
  (cd $REPO && python3 -m pytest -q -p no:cacheprovider tests/kernels/test_feature_map.py tests/kernels/test_rope.py tests/kernels/test_hybrid_continue.py tests/kernels/test_dispatch.py \
     tests/kernels/test_mixed_layers.py tests/kernels/test_segments.py tests/test_train_graph.py -k "cuda or dispatch or backends" 2>&1 | tail -4)
  ;;
genc)   # alone: decode with the compiled whole step (compile_decode=model) inside the CUDA graph, at 8k
  $L genc "ATTNSWAP_COMPILE_DECODE=model python generation.py --model $M --methods lolcats,~/runs/lizard-x9l,~/runs/lolcats-x9l,teacher --lengths 8192 --repeats 3 --json ~/res/genc.json"
  ;;
gendc)  # the same as gend through the compiled step (the first generate() of each model compiles)
  $L gendc "ATTNSWAP_COMPILE_DECODE=model python generation.py --model $M --methods lolcats,~/runs/d-lol,~/runs/d-liz --lengths 8192 --repeats 3 --label compiled --json ~/res/gendc.json"
  ;;
decode)  # detached, alone: decode speed of mixed models needs no training, so 20-step conversions with 9 exact
         # heads, then the generation suite at 8k through the default CUDA graph and through the compiled step
  mkdir -p ~/res
  S="linearize --model $M --exact-heads 9 --steps 20 --eval-tokens 2048 --overwrite"
  setsid nohup bash -c "cd $REPO/benchmarks && python -m attnswap.cli $S --out ~/runs/d-lol > ~/res/d-conv.log 2>&1 &&
    python -m attnswap.cli $S --attention lizard --out ~/runs/d-liz >> ~/res/d-conv.log 2>&1; echo \$? > ~/res/d-conv.rc
    $J gend; $W gend; $J gendc; echo done > ~/res/decode.rc" > ~/res/decode.log 2>&1 &
  : > ~/res/d-conv.log; echo "decode launched"
  ;;
fourth)  # detached, each alone: 20-step mixed models and decode at 8k through the CUDA graph (issue 16); the
         # profiler (prefill, and the chunked prefill through the continuation kernels, logits checked against
         # one pass); one 1000-step conversion (issue 17's wall time); last, decode through the compiled step
  mkdir -p ~/res
  S="linearize --model $M --exact-heads 9 --steps 20 --eval-tokens 2048 --overwrite"
  setsid nohup bash -c "cd $REPO/benchmarks && python -m attnswap.cli $S --out ~/runs/d-lol > ~/res/d-conv.log 2>&1 &&
    python -m attnswap.cli $S --attention lizard --out ~/runs/d-liz >> ~/res/d-conv.log 2>&1; echo \$? > ~/res/d-conv.rc
    $J gend; $W gend; $J prof2; $W prof2; $J alone; $W alone; $J gendc; $W gendc; echo done > ~/res/fourth.rc" > ~/res/fourth.log 2>&1 &
  : > ~/res/d-conv.log; echo "fourth launched"
  ;;
fifth)  # detached, each alone: decode at 8k through the compiled step, mixed models rebuilt untrained in the
         # calibrated layout (generation.py X9_LAYOUT); the profiler without traces; one conversion alone
  mkdir -p ~/res
  setsid nohup bash -c "$J gendc2; $W gendc2; $J prof3; $W prof3; $J alone; $W alone; echo done > ~/res/fifth.rc" > ~/res/fifth.log 2>&1 &
  echo "fifth launched"
  ;;
seventh)  # detached: three 1000-step conversions side by side (issue 16: lolcats with 9 exact heads on rows of
          # 8,192, for passkey at 8k; issue 14: the plain methods with a wider softmax window, for out-of-domain
          # perplexity); beside them generate()'s peak memory for prompt pieces of 8k, 16k and one pass (peak
          # memory is per process, so sharing the GPU does not move it; their times are not read); then the
          # chunked prefill timed alone
  mkdir -p ~/res
  $J b7
  setsid nohup bash -c "$J mem; $W mem; $W xlol9k lolw128 lizw256; $J prof8k; $W prof8k; echo done > ~/res/seventh.rc" > ~/res/seventh.log 2>&1 &
  echo "seventh launched"
  ;;
b7)
  q xlol9k linearize lolcats-x9k 8192 "--exact-heads 9 --seq-len 8192 --batch-size 1 --steps 1000"
  q lolw128 linearize lolcats-w128 8192 "--window 128 --steps 1000"
  q lizw256 linearize lizard-w256 8192 "--attention lizard --window 256 --steps 1000"
  ;;
mem)    # generate()'s peak memory and wall time at 8k and 32k with prompt pieces of 8k, 16k and one pass
  G="python generation.py --model $M --methods teacher,lolcats,lizard,lolcats-x9 --lengths 8192,32768 --new-tokens 16 --repeats 2"
  $L mem "$G --prefill-chunk 8192 --label c8192 --json ~/res/mem8k.json; $G --prefill-chunk 16384 --label c16384 --json ~/res/mem16k.json; $G --prefill-chunk 0 --label onepass --json ~/res/mem0.json"
  ;;
eighth)  # foreground, short (what the 264 s left at 5d1f2af ran): prefill timed with the new windows; the bf16
         # continuation and mixed-layer tests; generate()'s one-pass peak at 32k with 9 exact heads
  (cd $REPO/benchmarks && python profile_layer.py --model $M --methods teacher,lolcats --lengths 8192,32768 --repeats 5 2>&1 | tail -5)
  (cd $REPO && python3 -m pytest -q -p no:cacheprovider tests/kernels/test_hybrid_continue.py tests/kernels/test_mixed_layers.py -k cuda 2>&1 | tail -3)
  (cd $REPO/benchmarks && python generation.py --model $M --methods lolcats-x9 --lengths 32768 --new-tokens 16 --repeats 1 --prefill-chunk 0 2>&1 | tail -2)
  ;;
ninth)  # Foreground: the bf16 kernel tests (with the continuation at SmolLM2's shape and the default windows).
        # Then detached: alone, the prefill with its host time, and the chunked prefill against one pass in
        # 2,048-token pieces with the new windows (the 0.35 at 8k seen at 5d1f2af); three 1000-step conversions
        # side by side (lolcats with window 256, for 8k out of domain; lizard and lolcats with 9 exact heads on
        # rows of 8,192, at window 256), beside them cProfile of a prefill at 8k (host shares only); then the
        # trained models' chunked prefill, and decode of the 9-head models through the compiled step
  $J kerneltests
  mkdir -p ~/res
  setsid nohup bash -c "$J prof9; $W prof9a; $J b9; $J prof9c; $W lolw256 xliz9k xlol9w prof9c; $J prof9d; $W prof9d;
    $J gendc9; $W gendc9; echo done > ~/res/ninth.rc" > ~/res/ninth.log 2>&1 &
  echo "ninth launched"
  ;;
prof9)
  $L prof9a "python profile_layer.py --model $M --methods teacher,lolcats,lizard --lengths 8192,32768 --repeats 3 --chunk 2048 --json ~/res/prof9a.json"
  ;;
prof9c)
  $L prof9c "python profile_layer.py --model $M --methods teacher,lolcats,lizard --lengths 8192 --repeats 3 --pyprof --json ~/res/prof9c.json"
  ;;
b9)
  q lolw256 linearize lolcats-w256 8192 "--window 256 --steps 1000"
  q xliz9k linearize lizard-x9k 8192 "--attention lizard --exact-heads 9 --seq-len 8192 --batch-size 1 --steps 1000"
  q xlol9w linearize lolcats-x9w 8192 "--exact-heads 9 --window 256 --seq-len 8192 --batch-size 1 --steps 1000"
  ;;
prof9d) # trained models: the chunked prefill against one pass at 8k (2,048-token pieces)
  $L prof9d "python profile_layer.py --model $M --methods ~/runs/lolcats-w256,~/runs/lizard-x9k,~/runs/lolcats-x9w --lengths 8192 --repeats 3 --chunk 2048 --json ~/res/prof9d.json"
  ;;
gendc9)
  $L gendc9 "ATTNSWAP_COMPILE_DECODE=model python generation.py --model $M --methods teacher,~/runs/lizard-x9k,~/runs/lolcats-x9w --lengths 8192 --repeats 3 --label compiled --json ~/res/gendc9.json"
  ;;
tenth)  # foreground, short (the device time left after ninth): lolcats' window 256 against 128 for speed, and
        # the compiled decode at 8k with 9 exact heads at the default windows (issue 16's 5x)
  (cd $REPO/benchmarks && timeout 130 python generation.py --model $M --methods teacher,lolcats,lolcats:window=256 --lengths 8192,32768 --new-tokens 32 --repeats 2 --json ~/res/gen10.json 2>&1 | tail -8)
  (cd $REPO/benchmarks && ATTNSWAP_COMPILE_DECODE=model timeout 120 python generation.py --model $M --methods teacher,lizard-x9 --lengths 8192 --repeats 2 --label compiled --json ~/res/gendc10.json 2>&1 | tail -4)
  ;;
eleventh) # Foreground: the bf16 kernel tests (with the paired feature maps). Then detached: alone, prefill and
        # its host time after the paired feature maps and the owned state; a training step of each stage
        # profiled (issue 17's 3 minutes: where the LoRA stage's time goes); then side by side the two
        # 9-exact-head conversions on rows of 8,192 whose suites the ninth run lost, and plain lolcats (window
        # 256) on rows of 4,096 (issue 14's 8k target); beside them generate()'s peaks in one pass and in
        # 8,192-token pieces (peak memory is per process: sharing does not move it; their times are not read)
  $J kerneltests
  mkdir -p ~/res
  setsid nohup bash -c "$J prof11; $W prof11; $J proftrain; $W proftrain; $J b11; $J mem11; $W xliz9k xlol9w lol4kw mem11;
    echo done > ~/res/eleventh.rc" > ~/res/eleventh.log 2>&1 &
  : > ~/res/prof11.log; echo "eleventh launched"
  ;;
prof11)
  $L prof11 "python profile_layer.py --model $M --methods teacher,lolcats,lizard --lengths 8192,32768 --repeats 5 --chunk 8192 --json ~/res/prof11.json"
  ;;
proftrain)
  $L proftrain "ATTNSWAP_TRAIN_GRAPH=0 python profile_train.py --model $M --methods lolcats,lizard --steps 20 --trace --json ~/res/proftrain.json"
  ;;
mem11)
  G="python generation.py --model $M --methods teacher,lolcats,lizard --lengths 8192,32768 --new-tokens 16 --repeats 2"
  $L mem11 "$G --prefill-chunk 0 --label onepass --json ~/res/mem11a.json; $G --label c8192 --json ~/res/mem11b.json"
  ;;
b11)
  q xliz9k linearize lizard-x9k 8192 "--attention lizard --exact-heads 9 --seq-len 8192 --batch-size 1 --steps 1000"
  q xlol9w linearize lolcats-x9w 8192 "--exact-heads 9 --seq-len 8192 --batch-size 1 --steps 1000"
  q lol4kw linearize lolcats-4kw 8192 "--seq-len 4096 --batch-size 2 --steps 1000"
  ;;
gendc11) # compiling the step takes minutes: no timeout here
  $L gendc11 "ATTNSWAP_COMPILE_DECODE=model python generation.py --model $M --methods teacher,~/runs/lizard-x9k,~/runs/lolcats-x9w --lengths 8192 --repeats 3 --label compiled --json ~/res/gendc11.json"
  ;;
twelfth) # for the next session, foreground and short: the bf16 tests (with the graphed training step against the
         # eager one); a training step timed eagerly and as a CUDA graph; then one conversion alone with the
         # graphed step at the default rows (issue 17's 3 minutes) and the quality suite of its model
  $J kerneltests
  (cd $REPO/benchmarks && ATTNSWAP_TRAIN_GRAPH=0 python profile_train.py --model $M --methods lolcats,lizard --steps 20 2>&1 | tail -4)
  (cd $REPO/benchmarks && ATTNSWAP_TRAIN_GRAPH=1 python profile_train.py --model $M --methods lolcats,lizard --steps 20 2>&1 | tail -4)
  (cd $REPO/benchmarks && ATTNSWAP_TRAIN_GRAPH=1 python profile_train.py --model $M --methods lolcats --seq-len 4096 --batch-size 2 --steps 20 2>&1 | tail -3)
  mkdir -p ~/res
  $L galone "ATTNSWAP_TRAIN_GRAPH=1 python quality.py --model $M --convert linearize --out ~/runs/lolcats-graph $EV --json ~/res/galone.json -- --steps 1000 --eval-tokens 8192"
  ;;
thirteenth) # twelfth in one budget: the bf16 tests and the training step eager and graphed (foreground), then
         # detached: the graphed conversion alone, and b12 from the moment that model is saved (its suite
         # runs beside b12)
  $J kerneltests
  (cd $REPO/benchmarks && ATTNSWAP_TRAIN_GRAPH=0 python profile_train.py --model $M --methods lolcats,lizard --steps 20 2>&1 | tail -4)
  (cd $REPO/benchmarks && ATTNSWAP_TRAIN_GRAPH=1 python profile_train.py --model $M --methods lolcats,lizard --steps 20 2>&1 | tail -6)
  mkdir -p ~/res; : > ~/res/galone.log
  setsid nohup bash -c "$J galone1; while [ ! -f ~/runs/lolcats-graph/config.json ] && [ ! -f ~/res/galone.rc ]; do sleep 3; done
    $J b12; echo done > ~/res/thirteenth.rc" > ~/res/thirteenth.log 2>&1 &
  echo "thirteenth chain launched"
  ;;
fifteenth) # for the next session (fourteenth lost two machines): the launch cost and the prefill after the host-side
         # launch changes (1ae634c), with the state sums' split on and off at 32k (same run), alone, in the call; then
         # detached: the graphed conversion alone on rows of 8 x 1,024 (issue 17's 3 minutes), then lolcats with
         # 9 heads calibrated on the answers beside loza at 1000 steps (~13 minutes with their suites)
  mkdir -p ~/res
  $J launch14; $W launch14; $J prof15; $W prof15; $J trace15; $W trace15
  setsid nohup bash -c "$J galone8; $W galone8; $J b15; echo done > ~/res/fifteenth.rc" > ~/res/fifteenth.log 2>&1 &
  : > ~/res/galone8.log; echo "fifteenth chain launched"
  ;;
nineteenth) # cut to ~700 s of device time (failed starts spent 800 s): the CUDA tests of the blocked loss in the
         # call; then detached, each alone: a training step at lolcats' default rows (eager trace by operator, then
         # graphed with the blocked loss and with whole logits), the whole default command (issue 17's 3 minutes;
         # the GGUF already de-quantised into the cache by then, and its JSON splits the wall time by phase).
         # b19 (loza at 1000 steps beside GQA with --teacher-text 0.5), trace18 and prof18 wait for a budget
  mkdir -p ~/res
  $J tests19; $W tests19
  setsid nohup bash -c "$J proftrain19; $W proftrain19; $J galone19; $W galone19
    echo done > ~/res/nineteenth.rc" > ~/res/nineteenth.log 2>&1 &
  : > ~/res/proftrain19.log; echo "nineteenth chain launched"
  ;;
b19)
  q loza1k sparsify loza 16384 "--method loza --fraction 0.5 --steps 1000"
  q gqatt50 gqa gqa-sub-tt50 8192 "--kv-heads 1 --merge subspace --train all --steps 1000 --teacher-text 0.5"
  ;;
twentieth) # the linear backward cut into segments (built after nineteenth's trace showed its dk / dv kernels 3.8x slower
         # on rows of 2 x 4,096 than on 8 x 1,024, with 12 / 6 programs), in the call: its bf16 tests, then a graphed
         # training step at the default rows without and with the segments (--tuning bwd_segments=0 / 1; run as --bwd-segments), and the eager trace with them; then
         # nineteenth's galone19 detached (issue 17's 3 minutes), then b19 (two conversions side by side)
  $L tests20 "cd $REPO && python3 -m pytest -q -p no:cacheprovider tests/kernels/test_segments.py tests/kernels/test_linear_attn.py tests/kernels/test_hybrid_attn.py -k 'cuda' -rs"
  $W tests20; tail -3 ~/res/tests20.log
  P="python profile_train.py --model $M --methods lolcats --seq-len 4096 --batch-size 2"
  $L proftrain20 "$P --steps 20 --tuning bwd_segments=0 --json ~/res/proftrain20a.json && $P --steps 20 --tuning bwd_segments=1 --json ~/res/proftrain20s.json && ATTNSWAP_TRAIN_GRAPH=0 $P --warmup 2 --steps 3 --trace --trace-steps 2 --tuning bwd_segments=1"
  $W proftrain20
  setsid nohup bash -c "$J galone19; $W galone19; $J b19; $W loza1k gqatt50; echo done > ~/res/twentieth.rc" > ~/res/twentieth.log 2>&1 &
  : > ~/res/galone19.log; echo "twentieth chain launched"
  ;;
twentyfirst) # the sink keys' far queries in a kernel of their own (twentieth's trace: the window dk / dv kernel 1.13 ms a
         # call at 2 x 4,096, its sink tile's program walking every query) and the dk / dv kernel's half key tile
         # (head dim 128, window 128: twentieth's 4 failures), in the call: their bf16 tests, then a graphed step at
         # the default rows with the split and without it (--tuning bwd_sink_split=0), alone
  mkdir -p ~/res
  $L tests21 "cd $REPO && python3 -m pytest -q -p no:cacheprovider tests/kernels/test_hybrid_attn.py -k 'cuda and (far_queries or half_key or with_sinks)' -rs && python3 -m pytest -q -p no:cacheprovider 'tests/kernels/test_hybrid_attn.py::test_hybrid_attn_matches_naive[1-True-triton-cuda-bf16]' 'tests/kernels/test_hybrid_attn.py::test_hybrid_attn_matches_naive[1-False-triton-cuda-bf16]' -rs"
  $W tests21; tail -4 ~/res/tests21.log
  P="python profile_train.py --model $M --methods lolcats --seq-len 4096 --batch-size 2 --steps 20"
  $L proftrain21 "$P --json ~/res/proftrain21s.json && $P --tuning bwd_sink_split=0 --json ~/res/proftrain21w.json"
  ;;
twentysecond) # for the next session: in the call, the CUDA test of the fused AdamW (opt-in) and a graphed step at
         # the default rows with torch's default AdamW and with the fused one (update_ms: the host time after the
         # replay); then detached, each alone: the default command after 1c56a28's faster backward (issue 17's 3
         # minutes; at be04255 202 s, training 180 s; its summary now splits off the start-up), then the 8k
         # prefill traced and graphed
  mkdir -p ~/res
  $L tests22 "cd $REPO && python3 -m pytest -q -p no:cacheprovider tests/test_train_graph.py -rs"
  $W tests22; tail -3 ~/res/tests22.log
  P="python profile_train.py --model $M --methods lolcats --seq-len 4096 --batch-size 2 --steps 20"
  $L proftrain22 "$P --json ~/res/proftrain22d.json && ATTNSWAP_FUSED_ADAMW=1 $P --json ~/res/proftrain22f.json"
  $W proftrain22; grep -a -A2 "^method" ~/res/proftrain22.log
  setsid nohup bash -c "$J galone22; $W galone22; $J trace18; $W trace18; $J prof18; $W prof18
    echo done > ~/res/twentysecond.rc" > ~/res/twentysecond.log 2>&1 &
  : > ~/res/galone22.log; echo "twentysecond chain launched"
  ;;
galone22)
  $L galone22 "python quality.py --model $M --convert linearize --out ~/runs/lolcats-alone --tasks none --json ~/res/galone22.json -- --steps 1000"
  ;;
tests19)  # CUDA: the loss a block of rows at a time against whole logits (bf16; the graphed LoRA step)
  $L tests19 "cd $REPO && python3 -m pytest -q -p no:cacheprovider tests/test_logit_loss.py tests/test_train_graph.py -k 'cuda' -rs"
  ;;
proftrain19) # where a training step's device time goes at lolcats' default rows (4,096 x 2): eager steps traced by
         # operator, then the graphed step timed with the loss a block of rows at a time (the CPU's default; on CUDA
         # opt-in until this times it) and whole
  P="python profile_train.py --model $M --methods lolcats --seq-len 4096 --batch-size 2"
  $L proftrain19 "ATTNSWAP_TRAIN_GRAPH=0 $P --warmup 2 --steps 5 --trace --trace-steps 2 --json ~/res/proftrain19e.json && ATTNSWAP_CHUNKED_LOSS=1 $P --steps 20 --json ~/res/proftrain19g.json && ATTNSWAP_CHUNKED_LOSS=0 $P --steps 20 --json ~/res/proftrain19w.json"
  ;;
galone19)  # issue 17's 3 minutes: the default command alone (rows of 4,096 x 2), no quality suite
  $L galone19 "python quality.py --model $M --convert linearize --out ~/runs/lolcats-alone --tasks none --json ~/res/galone19.json -- --steps 1000"
  ;;
eighteenth) # where lolcats' 8k prefill spends its device time (the graphed prefill left it device-bound at cf9a050:
         # 26 ms against the teacher's 20.5), alone in the call; then, detached and three at a time (five sharing ran
         # loza out of memory): loza at 1000 steps, and GQA's transfer share and --teacher-text at 1000 steps
  mkdir -p ~/res
  $J trace18; $W trace18; $J prof18; $W prof18
  setsid nohup bash -c "$J b18; echo done > ~/res/eighteenth.rc" > ~/res/eighteenth.log 2>&1 &
  echo "eighteenth chain launched"
  ;;
trace18)  # device time by operator (self_cuda_time_total) of the whole-model prefill at 8k, teacher and lolcats
  $L trace18 "python profile_layer.py --model $M --methods teacher,lolcats --lengths 8192 --repeats 3 --trace --trace-dir ~/res/traces"
  ;;
prof18)   # the graphed 8k prefill after its state sums split from 2,048 keys (was 16,384; cf9a050: lolcats 26.1 ms)
  $L prof18 "python profile_layer.py --model $M --methods teacher,lolcats,lizard --lengths 8192 --repeats 5 --chunk 8192 --prefill-graph cuda --piece 8192 --json ~/res/prof18.json"
  ;;
b18)
  q loza1k sparsify loza 16384 "--method loza --fraction 0.5 --steps 1000"
  # --train all's default split is 200 + 800 (3bd7584): 400 + 600, and 200 + 800 with half the rows read written by
  # the teacher (--teacher-text 0.5, top-p 0.9: CPU, 60 steps, 2.27x against 2.41x out of domain, 1.85x against 1.74x in domain)
  q gqat400 gqa gqa-sub-t400 8192 "--kv-heads 1 --merge subspace --train all --steps 1000 --transfer-steps 400"
  q gqatt50 gqa gqa-sub-tt50 8192 "--kv-heads 1 --merge subspace --train all --steps 1000 --teacher-text 0.5"
  ;;
seventeenth) # the sixteenth cut to one session's 30 minutes: the CUDA tests and the graphed prefill (pieces of 2,048)
         # alone in the call; then, detached and side by side, issue 14's GQA rows (b15gqa) and issue 16's two open
         # rows (xlol9a, loza1k). galone8 and mem14 are left out (nothing they time changed since the fourteenth)
  mkdir -p ~/res
  $J tests16; $W tests16; $J prof17; $W prof17
  setsid nohup bash -c "$J b15gqa; $J b17; echo done > ~/res/seventeenth.rc" > ~/res/seventeenth.log 2>&1 &
  echo "seventeenth chain launched"
  ;;
prof17)
  $L prof17 "python profile_layer.py --model $M --methods teacher,lolcats,lizard --lengths 2048,8192,32768 --repeats 5 --prefill-graph cuda --piece 2048 --json ~/res/prof17.json"
  ;;
b17)
  q xlol9a linearize lolcats-x9a 8192 "--exact-heads 9 --calib-loss answers --seq-len 8192 --batch-size 1 --steps 1000"
  q loza1k sparsify loza 16384 "--method loza --fraction 0.5 --steps 1000"
  ;;
sixteenth) # prefill in fixed pieces replayed as CUDA graphs (modeling/prefill.py, off by default until this runs): the
         # CUDA tests first, then the prefill without and with the graphs (pieces of 2,048 and 8,192), alone, in the
         # call; then detached the fifteenth's chain (galone8, b15) and the GQA row
  mkdir -p ~/res
  $J tests16; $W tests16; $J prof16; $W prof16
  setsid nohup bash -c "$J galone8; $W galone8; $J b15; $J b15gqa; echo done > ~/res/sixteenth.rc" > ~/res/sixteenth.log 2>&1 &
  : > ~/res/galone8.log; echo "sixteenth chain launched"
  ;;
tests16)
  $L tests16 "cd $REPO && python3 -m pytest -q -p no:cacheprovider tests/test_prefill_graph.py tests/test_decode_graph.py tests/test_train_graph.py tests/kernels/test_hybrid_continue.py -k 'cuda or pieces' -rs"
  ;;
prof16)   # one pass against graphed pieces in the same run (a third table), pieces of 2,048 then of 8,192
  $L prof16 "python profile_layer.py --model $M --methods teacher,lolcats,lizard --lengths 2048,8192,32768 --repeats 5 --prefill-graph cuda --piece 2048 --json ~/res/prof16.json && python profile_layer.py --model $M --methods teacher,lolcats,lizard --lengths 8192,32768 --repeats 5 --prefill-graph cuda --piece 8192 --json ~/res/prof16p8k.json"
  ;;
prof15)
  $L prof15 "python profile_layer.py --model $M --methods teacher,lolcats,lizard --lengths 2048,8192,32768 --repeats 5 --chunk 8192 --json ~/res/prof15.json && python profile_layer.py --model $M --methods lolcats,lizard --lengths 32768 --repeats 5 --chunk 65536 --sum-split-from 1000000000 --json ~/res/prof15nosplit.json"
  ;;
b15gqa)  # (not in the chain: the session after, or in place of loza1k) issue 14's GQA with the value subspace, against
         # aligned's 1.778x out of domain at 2k (2ad8b13)
  # (the retrieval mix is gqa's new default, 0.5: the aligned run at 2ad8b13 had 0.25)
  q gqasub gqa gqa-sub 8192 "--kv-heads 1 --merge subspace --train all --steps 1000"
  # on rows of 4,096 x 2 (lolcats' default): retrieval is trained at 4x the distance (no merge keeps any: 0% passkey
  # and MQAR before training on the CPU, for aligned and subspace alike)
  q gqasub4k gqa gqa-sub-4k 8192 "--kv-heads 1 --merge subspace --train all --steps 1000 --seq-len 4096 --batch-size 2"
  # the same 1000 steps with the first 200 on attention-block transfer (lost step for step at 60 CPU steps: 7432b0c)
  q gqasubt gqa gqa-sub-t200 8192 "--kv-heads 1 --merge subspace --train all --steps 1000 --transfer-steps 200"
  ;;
trace15) # the prefill's and the cache-less forward's top operators at 2k (lolcats pays 26 ms more for the cache at 7f2d365)
  $L trace15 "python profile_layer.py --model $M --methods teacher,lolcats --lengths 2048 --repeats 3 --trace --trace-dir ~/res/traces"
  ;;
b15)
  q xlol9a linearize lolcats-x9a 8192 "--exact-heads 9 --calib-loss answers --seq-len 8192 --batch-size 1 --steps 1000"
  q loza1k sparsify loza 16384 "--method loza --fraction 0.5 --steps 1000"
  $L mem14 "python generation.py --model $M --methods teacher,lolcats,lizard --lengths 8192,32768 --new-tokens 16 --repeats 2 --label default --json ~/res/mem14.json"
  ;;
fourteenth) # the launch cost and the prefill re-timed after the host-side launch changes, alone (in the call); then,
         # detached, the graphed conversion alone on issue 17's rows of 8 x 1,024 (its 3 minutes, phases itemised),
         # then issue 16's open rows side by side: lolcats with 9 heads calibrated on the answers, loza at 1000 steps
  mkdir -p ~/res
  $J launch14; $W launch14; $J prof14; $W prof14
  setsid nohup bash -c "$J galone8; $W galone8; $J b14b; echo done > ~/res/fourteenth.rc" > ~/res/fourteenth.log 2>&1 &
  : > ~/res/galone8.log; echo "fourteenth chain launched"
  ;;
launch14) # what one launch costs this host: ATen operators against our Triton entry points
  $L launch14 "python launch_cost.py --tokens 512 --calls 200 --repeats 7"
  ;;
prof14)
  $L prof14 "python profile_layer.py --model $M --methods teacher,lolcats,lizard --lengths 2048,8192,32768 --repeats 5 --chunk 8192 --json ~/res/prof14.json"
  ;;
pyprof14) # where a prefill's host time goes, by Python function (cProfile: read the shares)
  $L pyprof14 "python profile_layer.py --model $M --methods teacher,lolcats --lengths 2048 --repeats 3 --pyprof"
  ;;
galone8)
  $L galone8 "python quality.py --model $M --convert linearize --out ~/runs/lolcats-8x1k --tasks none --json ~/res/galone8.json -- --seq-len 1024 --batch-size 8 --steps 1000"
  ;;
b14b)    # 2 conversions side by side (~13 minutes with their suites): lolcats with 9 heads calibrated on the answers
         # (47% passkey at 8k on the plain loss), loza at 1000 steps; generate()'s peaks beside them
  q xlol9a linearize lolcats-x9a 8192 "--exact-heads 9 --calib-loss answers --seq-len 8192 --batch-size 1 --steps 1000"
  # q loza1k sparsify loza 16384 "--method loza --fraction 0.5 --steps 1000"   (dropped: a lost machine took the time)
  # generate()'s peaks with the new CUDA default (one pass up to 32k for fully recurrent models)
  $L mem14 "python generation.py --model $M --methods teacher,lolcats,lizard --lengths 8192,32768 --new-tokens 16 --repeats 2 --label default --json ~/res/mem14.json"
  ;;
galone1)
  $L galone "ATTNSWAP_TRAIN_GRAPH=1 python quality.py --model $M --convert linearize --out ~/runs/lolcats-graph $EV --json ~/res/galone.json -- --steps 1000 --eval-tokens 8192"
  ;;
b12)     # issue 16's rows still without a full result: lizard with 9 exact heads on rows of 8,192 (stopped twice),
         # lolcats with 9 heads ranked by the retrieval probe (against eleventh's alpha ranking: passkey at 8k),
         # side by side, ~17 minutes with their suites; loza at 1000 steps (lost twice) is b12loza, ~20 minutes
  q xliz9k linearize lizard-x9k 8192 "--attention lizard --exact-heads 9 --seq-len 8192 --batch-size 1 --steps 1000"
  q xlol9p linearize lolcats-x9p 8192 "--exact-heads 9 --exact-heads-by probe --seq-len 8192 --batch-size 1 --steps 1000"
  ;;
b12loza)
  q loza1k sparsify loza 16384 "--method loza --fraction 0.5 --steps 1000"
  ;;
prof8k)
  $L prof8k "python profile_layer.py --model $M --methods teacher,lolcats,lizard --lengths 32768 --chunk 8192 --repeats 5 --json ~/res/prof8k.json"
  ;;
gendc2) # compiled decode at 8k, the teacher and untrained models (plain, and 9 exact heads in the calibrated layout)
  $L gendc2 "ATTNSWAP_COMPILE_DECODE=model python generation.py --model $M --methods teacher,lolcats,lolcats-x9,lizard-x9 --lengths 8192 --repeats 3 --label compiled --json ~/res/gendc2.json"
  ;;
prof3)  # prof2 without traces: prefill and the chunked prefill (logits checked against one pass)
  $L prof3 "python profile_layer.py --model $M --lengths 2048,8192,32768 --repeats 5 --json ~/res/prof3.json"
  ;;
gend)   # the suite through the default decode path (CUDA graph)
  $L gend "python generation.py --model $M --methods teacher,lolcats,~/runs/d-lol,~/runs/d-liz --lengths 8192 --repeats 3 --label graph --json ~/res/gend.json"
  ;;
gen8)   # alone, after short: decode/prefill/cache of its conversions beside the teacher
  g gen8 teacher,lolcats,lizard,~/runs/lizard-x9,~/runs/lolcats-x9,~/runs/loza
  ;;
gen)    # alone: decode/prefill/cache of the trained conversions beside the teacher
  g gen2 teacher,lolcats,lizard,~/runs/lizard-x3,~/runs/lizard-x6,~/runs/lizard-x9,~/runs/lolcats-x9,~/runs/loza
  ;;
esac
