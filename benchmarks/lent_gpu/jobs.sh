#!/usr/bin/env bash
# jobs.sh PHASE : the measured commands (run from benchmarks/ via launch.sh). The phases of sessions before the
# eighteenth are in git history (git log -p -- benchmarks/lent_gpu/jobs.sh); docs/BENCHMARKS.md names each run's commit
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
prof2)  # alone: per-layer and whole-model timing with prefill into a cache; traces of the prefill
  $L prof2 "python profile_layer.py --model $M --lengths 2048,8192,32768 --repeats 5 --trace --trace-dir ~/res/traces --json ~/res/prof2.json"
  ;;
kerneltests)  # foreground, bf16 on the GPU: this wave's kernels and the model on both backends
  (cd $REPO && python3 -m pytest -q -p no:cacheprovider tests/kernels/test_feature_map.py tests/kernels/test_rope.py tests/kernels/test_hybrid_continue.py tests/kernels/test_dispatch.py \
     tests/kernels/test_mixed_layers.py tests/kernels/test_segments.py tests/test_train_graph.py -k "cuda or dispatch or backends" 2>&1 | tail -4)
  ;;
mem)    # generate()'s peak memory and wall time at 8k and 32k with prompt pieces of 8k, 16k and one pass
  G="python generation.py --model $M --methods teacher,lolcats,lizard,lolcats-x9 --lengths 8192,32768 --new-tokens 16 --repeats 2"
  $L mem "$G --prefill-chunk 8192 --label c8192 --json ~/res/mem8k.json; $G --prefill-chunk 16384 --label c16384 --json ~/res/mem16k.json; $G --prefill-chunk 0 --label onepass --json ~/res/mem0.json"
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
  $J gqatt50
  ;;
gqatt50)  # issue 14: GQA 3 -> 1 with half the rows read written by the teacher (--teacher-text 0.5); beside loza1k its
          # sampling reached 3.46 M of 4.1 M tokens in 7.6 minutes (be04255), so alone it goes after the short jobs
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
         # minutes; at be04255 202 s, training 180 s; its summary now splits off the start-up), GQA with
         # --teacher-text 0.5 (issue 14), then the 8k prefill traced and graphed
  mkdir -p ~/res
  $L tests22 "cd $REPO && python3 -m pytest -q -p no:cacheprovider tests/test_train_graph.py -rs"
  $W tests22; tail -3 ~/res/tests22.log
  P="python profile_train.py --model $M --methods lolcats --seq-len 4096 --batch-size 2 --steps 20"
  $L proftrain22 "$P --json ~/res/proftrain22d.json && ATTNSWAP_FUSED_ADAMW=1 $P --json ~/res/proftrain22f.json"
  $W proftrain22; grep -a -A2 "^method" ~/res/proftrain22.log
  setsid nohup bash -c "$J galone22; $W galone22; $J gqatt50; $W gqatt50; $J trace18; $W trace18; $J prof18; $W prof18
    echo done > ~/res/twentysecond.rc" > ~/res/twentysecond.log 2>&1 &
  : > ~/res/galone22.log; echo "twentysecond chain launched"
  ;;
twentythird) # for the next session: in the call (~1 minute) the train-graph tests in one process (the accelerate state
         # reset between tests: twentysecond's 2 CPU-after-CUDA failures) and the segment tests in bf16 (the reverse
         # sums' Triton kernel, one-chunk segments); then detached, each alone, ~13 minutes: k23, pt23, p23, then b23
  mkdir -p ~/res
  $L tests23 "cd $REPO && python3 -m pytest -q -p no:cacheprovider tests/test_train_graph.py tests/kernels/test_segments.py -k 'cuda or graph or update or backward_segments' -rs"
  $W tests23; tail -3 ~/res/tests23.log
  # the kernels' registers and spills as the image's Triton 3.6 builds them (the CPU's Triton 3.9: the hybrid forward
  # at SmolLM2's prefill settings 255 registers and 776 bytes of spills a thread)
  (cd $REPO && env -u TRITON_INTERPRET python3 tests/compile_sm90.py 2>&1 | grep shared=)
  # where galone22's 12.3 s of start-up go (the CPU's convert reaches its clock after 3.0 s): imports, then CUDA
  python3 -X importtime -c "import attnswap.cli" 2> ~/res/importtime.log
  python3 -c "from attnswap.pipelines.common import process_age as a; import attnswap.cli; t = a(); import torch; torch.zeros(1, device='cuda'); print(f'imports {t:.2f} s, with CUDA {a():.2f} s')"
  sort -t'|' -k2 -n -r ~/res/importtime.log | head -8
  setsid nohup bash -c "$J k23; $W kernels23; $J pt23; $W proftrain23; $J p23; $W prof23; $J b23; $W gqalr3e5 gqalr3e4 gqarm25
    echo done > ~/res/twentythird.rc" > ~/res/twentythird.log 2>&1 &
  : > ~/res/kernels23.log; echo "twentythird chain launched"
  ;;
twentyfourth) # for the next session. Everything detached, each job alone, in this order (~22 minutes): the warps knobs'
         # bf16 tests (~1 minute; twentythird's tests in the call took 255 s of a 600 s call); every launch's warps in
         # turn (twentythird: 4 warps halved the hybrid forward, whose 8 nobody had timed); the default command alone
         # at the new defaults (4 warps in the lolcats step; 158.6 s on the H200 at 9dd94e2); the prefill at the new
         # defaults with lizard's step (gated: keeps 8 warps); last, GQA's four runs side by side (b24: b23's learning
         # rates and retrieval share, stopped at step ~727 of 800 last time to free the GPU, and --hidden-weight 1)
  mkdir -p ~/res
  setsid nohup bash -c "$J tests24; $W tests24; $J k24; $W kernels24; $J galone24; $W galone24; $J p24; $W prof24
    $J b24; $W gqalr3e5 gqalr3e4 gqarm25 gqahw; echo done > ~/res/twentyfourth.rc" > ~/res/twentyfourth.log 2>&1 &
  : > ~/res/tests24.log; echo "twentyfourth chain launched"
  ;;
twentyninth) # for the next session (~15 minutes). Alone: decode at 8k through the compiled step (3f77fb9 retries a
         # failed compile without persistent reductions in-process: lizard-x9 should compile, ~4 min). Then the heads
         # ranked by their gradient toward exact attention on the 8k answer, and lolcats with those 9 exact (attr29.sh)
  mkdir -p ~/res
  setsid nohup bash -c "$J dec29; $W dec29; $J attr29; $W attr29; echo done > ~/res/twentyninth.rc" \
    > ~/res/twentyninth.log 2>&1 &
  : > ~/res/dec29.log; echo "twentyninth chain launched"
  ;;
dec29)    # alone: the teacher and the fixed 9-exact-head layouts, compiled whole step, in one run
  $L dec29 "ATTNSWAP_COMPILE_DECODE=model python generation.py --model $M --methods teacher,lolcats-x9,lizard-x9 --lengths 8192 --repeats 3 --json ~/res/dec29.json"
  ;;
attr29)   # streaming_probe --attribute over 8k passkey prompts (depth 1; depths 0.5 and 1), each top 9 probed, then lolcats with each exact
  $L attr29 "bash $REPO/benchmarks/lent_gpu/attr29.sh"
  ;;
twentyeighth) # ~15 minutes. Side by side (none times anything): lolcats with 9 exact heads on the default rows and
         # on rows of 8,192 (lizard's shliz28 left out for device time), each with passkey at 1k-8k, 8 prompts a cell, scored strict and loose (a 16-token answer: does the model at 8k, depth 1, restate the
         # question before the key, or lose it?) with its misses printed; the untrained streaming probe over the
         # passkey grid and its bisections. Then alone: decode at 8k through the compiled step (issue 16: lizard
         # with 9 exact heads was 4.8x the teacher at d96fde1, window 128; the window is 256 since)
  mkdir -p ~/res
  setsid nohup bash -c "$J long28; $J sp28; $W shlol28 shlol8k28 sp28; $J dec28; $W dec28; echo done > ~/res/twentyeighth.rc" \
    > ~/res/twentyeighth.log 2>&1 &
  : > ~/res/shlol28.log; echo "twentyeighth chain launched"
  ;;
sp28)     # the streaming probe: lolcats-27's 9 exact heads, the eval's grid; then which layers' far attention the format
          # needs (8k, depth 1), and whether a wider window or more sinks stand in for it
  X="--model $M --exact 3.1,5.2,7.2,8.0,17.1,18.2,20.1,20.2,23.0"; S="python streaming_probe.py $X --variants streaming --lengths 8192 --depths 1 --samples 4 --answer 16"
  $L sp28 "python streaming_probe.py $X --lengths 4096,8192 --depths 0.5,1 --samples 4 --answer 16 --json ~/res/sp28.json && $S --full-layers '0-14;0-7'"
  ;;
long28)   # 9 exact heads, 1000 steps, passkey only (strict, loose, misses) at 1k-8k with 8 prompts a cell
  P="--tasks passkey --lengths 1024,2048,4096,8192 --samples 8 --ood-data none"
  $L shlol28 "python quality.py --model $M --convert linearize --out ~/runs/lol28 $P --json ~/res/shlol28.json -- --exact-heads 9 --steps 1000 --eval-tokens 8192"
  $L shlol8k28 "python quality.py --model $M --convert linearize --out ~/runs/lol8k28 $P --json ~/res/shlol8k28.json -- --exact-heads 9 --steps 1000 --seq-len 8192 --batch-size 1 --eval-tokens 8192"
  # $L shliz28 "python quality.py --model $M --convert linearize --out ~/runs/liz28 $P --json ~/res/shliz28.json -- --attention lizard --exact-heads 9 --steps 1000 --eval-tokens 8192"
  ;;
dec28)    # alone: decode at 8k, the teacher and the fixed 9-exact-head layouts (speed does not depend on the weights)
  $L dec28 "ATTNSWAP_COMPILE_DECODE=model python generation.py --model $M --methods teacher,lizard-x9,lolcats-x9 --lengths 8192 --repeats 3 --json ~/res/dec28.json"
  ;;
twentyseventh) # for the next session (~25 minutes). Alone: the linear backward's new warps rule against fla in one run
         # (kfla27, ~2 min). Then side by side (neither times anything): lizard and lolcats with 9 exact heads at 1000
         # steps (lizard also on rows of 4,096), each followed by attention_shares.py (issue 16: does the window's share
         # of each head shrink with the prompt, does capping the linear branch's weight bring the key back, and does the
         # model in teacher mode miss where the student does?), ~18 min
  mkdir -p ~/res
  setsid nohup bash -c "$J kfla27; $W kfla27; $J shares27; $W shliz27 shliz4k27 shlol27 shliz0l27; echo done > ~/res/twentyseventh.rc" \
    > ~/res/twentyseventh.log 2>&1 &
  : > ~/res/kfla27.log; echo "twentyseventh chain launched"
  ;;
kfla27)   # linear / hybrid forward+backward at 16k / 64k with la_backward_warps (4 warps ungated), fla in the same run
  $L kfla27 "python kernel_speed.py --shapes 32h --lengths 16384,65536"
  ;;
shares27) # train, save, then probe where each head looks at the last position of passkey prompts; caps 0 (none) and the
          # method's training row length (lizard 1,024, lolcats 4,096); lizard again on rows of 4,096 (does the converted
          # model in teacher mode, its LoRA-merged weights with full softmax, lose the key's format at 4k / 8k as the
          # 120-step CPU lizard did, and do longer rows keep it?)
  P="--baseline $M --lengths 2048,4096,8192 --depths 0,0.5,1 --samples 2"
  $L shliz27 "python quality.py --model $M --convert linearize --out ~/runs/lizard-x9 --tasks passkey --lengths 2048,4096,8192 --samples 4 --ood-data none --json ~/res/shliz27q.json -- --attention lizard --exact-heads 9 --steps 1000 --eval-tokens 8192 && python attention_shares.py --model ~/runs/lizard-x9 $P --caps 0,1024,256 --json ~/res/shliz27.json"
  $L shliz4k27 "python quality.py --model $M --convert linearize --out ~/runs/lizard-x9-4k --tasks passkey --lengths 2048,4096,8192 --samples 4 --ood-data none --json ~/res/shliz4k27q.json -- --attention lizard --exact-heads 9 --steps 1000 --seq-len 4096 --batch-size 2 --eval-tokens 8192 && python attention_shares.py --model ~/runs/lizard-x9-4k $P --caps 0 --json ~/res/shliz4k27.json"
  # the same lizard without its LoRA stage (400 transfer + 100 calibration steps): is the format lost at 4k / 8k by the
  # LoRA trained on rows of 1,024, or already by the converted attention?
  $L shliz0l27 "python quality.py --model $M --convert linearize --out ~/runs/lizard-x9-nolora --tasks passkey --lengths 2048,4096,8192 --samples 4 --ood-data none --json ~/res/shliz0l27q.json -- --attention lizard --exact-heads 9 --steps 500 --transfer-steps 400 --calib-steps 100 --lora-steps 0 --eval-tokens 8192 && python attention_shares.py --model ~/runs/lizard-x9-nolora $P --caps 0 --json ~/res/shliz0l27.json"
  # (at c03e738 shlol27 ran out of GPU memory beside the three lizards; it was resumed alone from its step-500
  # checkpoint with --resume, and attention_shares.py run with --lengths 4096,8192 --caps 0)
  $L shlol27 "python quality.py --model $M --convert linearize --out ~/runs/lolcats-x9 --tasks passkey --lengths 2048,4096,8192 --samples 4 --ood-data none --json ~/res/shlol27q.json -- --exact-heads 9 --steps 1000 --eval-tokens 8192 && python attention_shares.py --model ~/runs/lolcats-x9 $P --caps 0,4096,1024 --json ~/res/shlol27.json"
  ;;
twentysixth) # for the next session (~25 minutes): what twentyfifth could not reach. Alone, in turn: the warps at SmolLM2's
         # shape (k25s, ~2 min), the 32-head knobs kernels24 did not reach (k25, ~4 min), the default command at the
         # committed defaults (galone24, ~3.5 min); then side by side (neither times anything): GQA's four (b24) and
         # lizard's passkey diagnosis (lizdiag25), ~14 min
  mkdir -p ~/res
  setsid nohup bash -c "$J k25s; $W kernels25s; $J k25; $W kernels25; $J galone24; $W galone24; $J b24; $J lizdiag25
    $W gqalr3e5 gqalr3e4 gqarm25 gqahw lizdiag25; echo done > ~/res/twentysixth.rc" > ~/res/twentysixth.log 2>&1 &
  : > ~/res/kernels25s.log; echo "twentysixth chain launched"
  ;;
twentyfifth) # twentyfourth cut to the ~25 minutes left after two failed starts, GQA's b24 (~14 minutes) left out: in
         # parallel (neither times anything) the warps / mixed-layer CUDA tests and the real model's long-prompt
         # parity (issue 16: is lizard's passkey cliff at 4k the fast path?); then alone, in turn: the warps
         # sweeps, the prefill at the committed defaults, and the default command at the new defaults
  mkdir -p ~/res
  setsid nohup bash -c "$J tests24; $J parity25; $W tests24 parity25; $J k24; $W kernels24; $J p24; $W prof24
    $J galone24; $W galone24; echo done > ~/res/twentyfifth.rc" > ~/res/twentyfifth.log 2>&1 &
  : > ~/res/tests24.log; : > ~/res/parity25.log; echo "twentyfifth chain launched"
  ;;
lizdiag25) # issue 16: lizard with 9 exact heads at 1000 steps (2ad8b13's recipe: 100 / 100 / 3 / 0%), passkey only,
          # now with the key also scored by teacher forcing; then the saved model's passkey at 4k on the PyTorch path
  $L lizdiag25 "python quality.py --model $M --convert linearize --out ~/runs/lizard-x9 --tasks passkey --lengths 2048,4096,8192 --samples 4 --ood-data none --json ~/res/lizdiag25.json -- --attention lizard --exact-heads 9 --steps 1000 --eval-tokens 8192 && ATTNSWAP_KERNELS=torch python -m attnswap.cli eval ~/runs/lizard-x9 --baseline $M --tasks passkey --lengths 4096 --samples 4 --report-dir ~/runs/lizard-x9-torch --json ~/res/lizdiag25t.json"
  ;;
twentyfifth2) # the same session's second machine (the first was released while idle, galone24 lost with it; ~14
          # minutes left): lizard's passkey diagnosis, then every warps knob at SmolLM2's shape at 8k, alone
  mkdir -p ~/res
  setsid nohup bash -c "$J lizdiag25; $W lizdiag25; $J k25s; $W kernels25s; echo done > ~/res/twentyfifth2.rc" > ~/res/twentyfifth2.log 2>&1 &
  : > ~/res/lizdiag25.log; echo "twentyfifth2 chain launched"
  ;;
k25s)     # every warps knob at SmolLM2's shape at 8k (kernels24 reached only 32 heads x 16k)
  $L kernels25s "python kernel_speed.py --warps-sweep --shapes smollm2 --lengths 8192"
  ;;
k25)      # kernels24 broke at hybrid_warps=16 (illegal memory access, the process's CUDA context lost with it): the
          # knobs it did not reach at 32 heads x 16k, and the linear forward's again (its rule now 4 warps here)
  K="python kernel_speed.py --warps-sweep"
  $L kernels25 "$K --shapes 32h --lengths 16384 --warps-knobs la_fwd_warps,seg_state_warps,la_bwd_warps,la_bwd_dv_warps,rev_seg_warps,bwd_dq_warps,hybrid_bwd_dkv_warps"
  ;;
parity25) # generate() and the passkey loop on the real model from 2k / 4k / 8k prompts against one fp32 forward, 9 exact
          # heads; then lizard with strong decays (gate bias 2: 0.88 a token), as trained gates may have
  $L parity25 "python long_prompt_parity.py --model $M --lengths 2048,4133,8300 && python long_prompt_parity.py --model $M --methods lizard --lengths 2048,4133,8300 --gate-bias 2"
  ;;
tests24)
  $L tests24 "cd $REPO && python3 -m pytest -q -p no:cacheprovider tests/kernels/test_warps.py tests/kernels/test_mixed_layers.py -rs"
  ;;
k24)      # each launch's warps in turn at 32 heads x 16k and SmolLM2's shape at 8k (rows against the defaults' row)
  $L kernels24 "python kernel_speed.py --warps-sweep --shapes 32h,smollm2 --lengths 16384 && python kernel_speed.py --warps-sweep --shapes smollm2 --lengths 8192"
  ;;
galone24)
  $L galone24 "python quality.py --model $M --convert linearize --out ~/runs/lolcats-alone --tasks none --json ~/res/galone24.json -- --steps 1000"
  ;;
p24)      # twentythird's prefill at the committed defaults; the 32k prompt graphed as one piece (in 8k pieces it took 87 ms,
          # one pass 69 ms, the teacher 133 ms: issue 17 asks 3x); then lizard's training step (gated forward on 8 warps)
  $L prof24 "python profile_layer.py --model $M --methods teacher,lolcats,lizard --lengths 8192,32768 --repeats 5 --chunk 32768 --prefill-graph cuda --piece 8192 --json ~/res/prof24.json && python profile_layer.py --model $M --methods lolcats --lengths 32768 --repeats 5 --chunk 32768 --prefill-graph cuda --piece 32768 --json ~/res/prof24p.json && python profile_train.py --model $M --methods lolcats,lizard --seq-len 4096 --batch-size 2 --steps 20 --json ~/res/proftrain24.json"
  ;;
k23)      # the kernels after the backward's segments were kept to few programs (twentysecond: lin fb 6.38 ms with them at
          # 32 heads x 16k, 4.38 without), then with segments again (their reverse sums now a Triton kernel), then
          # lolcats' 8k / 32k prefill kernel under segment plans (twentysecond's trace: 364 us a layer at 8k, 16
          # segments x 9 heads = 144 programs on 132 SMs); fla's gated forward is timed alone now
  K="python kernel_speed.py --shapes 32h --lengths 16384,65536"
  $L kernels23 "$K && $K --no-fla --no-decode --tuning bwd_segments_max_per_sm=8 && python kernel_speed.py --prefill-sweep --lengths 8192,32768"
  ;;
pt23)     # the default step (fused AdamW now the default) at 2 x 4,096; at 8 x 1,024 (48 programs) without and with the
          # backward's segments, to place the line; at 2 x 4,096 with a segment per chunk
  P="python profile_train.py --model $M --methods lolcats --steps 20"
  $L proftrain23 "$P --seq-len 4096 --batch-size 2 --json ~/res/proftrain23d.json && $P --json ~/res/proftrain23a.json && $P --tuning bwd_segments_max_per_sm=1 --json ~/res/proftrain23b.json && $P --seq-len 4096 --batch-size 2 --tuning min_segment_chunks=1 --tuning programs_per_sm=16 --json ~/res/proftrain23s.json"
  ;;
p23)      # the graphed 8k / 32k prefill (prof18's command) with the default plan and with a segment per chunk
  G="python profile_layer.py --model $M --methods teacher,lolcats --lengths 8192,32768 --repeats 5 --chunk 32768 --prefill-graph cuda --piece 8192"
  $L prof23 "$G --json ~/res/prof23d.json && $G --tuning min_segment_chunks=1 --tuning programs_per_sm=16 --json ~/res/prof23s.json && $G --tuning min_segment_chunks=1 --tuning programs_per_sm=16 --tuning scan_cumsum_from=2 --json ~/res/prof23c.json"
  ;;
b23)      # issue 14's GQA, three side by side (each ~14 GB): the learning rate of --train all (1e-4 by default) at
          # 3e-5 and 3e-4, and a quarter of the rows carrying retrieval (0.5 by default: CPU-chosen, no GPU comparison)
  q gqalr3e5 gqa gqa-lr3e5 8192 "--kv-heads 1 --train all --steps 1000 --lr 3e-5"
  q gqalr3e4 gqa gqa-lr3e4 8192 "--kv-heads 1 --train all --steps 1000 --lr 3e-4"
  q gqarm25 gqa gqa-rm25 8192 "--kv-heads 1 --train all --steps 1000 --retrieval-mix 0.25"
  ;;
b24)      # b23's three (run at 74524bc with a fourth, --hidden-weight 1, since removed: it lost); side by side (~14 GB each)
  $J b23
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
gen)    # alone: decode/prefill/cache of untrained conversions and the saved ones (galone*, b18 / b19) beside the teacher
  g gen teacher,lolcats,lizard,~/runs/lolcats-alone,~/runs/loza
  ;;
esac
