"""Where a conversion's training time goes: both distillation stages of ``linearize`` timed per step,
and (``--trace``) torch.profiler's top operators of a few steps of each.

For each method (a conversion made untrained from the teacher, default options unless given as
``lolcats:window=128``), on random token rows of the default training shape (``--batch-size`` rows of
``--seq-len``; timing does not depend on the text):
- ``transfer ms/step``, ``lora ms/step``: the median wall time of a step of stage 1 (attention
  transfer: the decoder stack in transfer mode, feature maps and mixing factors trained) and of stage 2
  (LoRA: the teacher's logits, the student's, KL, backward), after ``--warmup`` steps of each; every
  step ends by reading its loss, so the times include the device's work;
- ``tok/s`` of each stage at that median, and ``1000 steps s``: what ``--steps 1000`` would take at the
  default 40 / 60 split (``distill.split_steps``), training only (no loading, evaluation or saving);
- with ``--trace``: the top operators of ``--trace-steps`` further steps of each stage, by self device
  time and by self host time;
- on CUDA each stage's step is replayed as a CUDA graph (``distill.train.StepGraph``, the default);
  ``graph steps`` says how many steps of each stage were; ``ATTNSWAP_TRAIN_GRAPH=0`` in the
  environment times the eager steps;
- ``peak_gib``: on CUDA the device memory each stage peaked at, on the CPU the process's resident
  high-water mark after it (it includes the teacher's weights, and never goes down); the LoRA stage's
  loss runs a block of rows at a time (``distill/logit_loss.py``) unless ``ATTNSWAP_CHUNKED_LOSS=0``
  (whole logits); ``--stages lora --warmup 0 --steps 1`` measures one LoRA step alone;
- ``update_ms``: each stage's median host time from the NaN guard's check (a sync) to the end of the
  optimiser's step and schedule: work the device waits for after a graph's replay;
  on CUDA the optimiser is torch's fused AdamW, ``ATTNSWAP_FUSED_ADAMW=0`` times torch's default instead
  (``distill.train.adamw``).

    python benchmarks/profile_train.py --model llama --methods lolcats,lizard --steps 20 --trace
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics

import torch

import attnswap  # noqa: F401  (registers converted models)
from attnswap import loading
from attnswap.convert.swap import make_swap
from attnswap.distill import logit_loss
from attnswap.distill.train import DistillConfig, adamw, distill, split_steps
from attnswap.modeling import convert_model
from _common import add_tuning_option, apply_tuning, commit as _commit, method_spec  # noqa: E402  (benchmarks/_common.py)

STAGES = {"attention transfer": "transfer", "LoRA distillation": "lora"}


def _stage_cfg(stage: str, steps: int, batch_size: int) -> DistillConfig:
    return DistillConfig(transfer_steps=steps if stage == "transfer" else 0,
                         lora_steps=steps if stage == "lora" else 0, batch_size=batch_size, warmup=1)


def time_stages(model, seqs, batch_size: int, warmup: int, steps: int, stages=("transfer", "lora")) -> dict:
    """Median step time (s) of each stage, after ``warmup`` steps of it (their times are dropped)."""
    out = {"graph_steps": {}, "peak_gib": {}, "update_ms": {}}
    cuda = next(model.parameters()).device.type == "cuda"
    for stage in stages:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        _, stats = distill(model, seqs, _stage_cfg(stage, warmup + steps, batch_size))
        times = next(t for name, t in stats.step_seconds.items() if STAGES[name] == stage)
        out[stage] = statistics.median(times[warmup:])
        updates = next(t for name, t in stats.update_seconds.items() if STAGES[name] == stage)
        out["update_ms"][stage] = round(1e3 * statistics.median(updates[warmup:]), 3)  # clipping + optimizer + schedule
        out["graph_steps"].update(stats.graph_steps)
        if cuda:
            out["peak_gib"][stage] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        else:  # the process's resident high-water mark so far (Linux reports KiB): it never goes down
            import resource

            out["peak_gib"][stage] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def trace_stages(model, seqs, batch_size: int, steps: int, rows: int = 25):
    from torch.profiler import ProfilerActivity, profile as prof

    cuda = next(model.parameters()).device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for stage in ("transfer", "lora"):
        with prof(activities=acts) as p:
            distill(model, seqs, _stage_cfg(stage, steps, batch_size))
        for key in ["self_cpu_time_total"] + (["self_cuda_time_total"] if cuda else []):
            table = p.key_averages().table(sort_by=key, row_limit=rows)
            print(f"\n--- {stage}, {steps} steps, top operators by {key}\n{table}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama", help="the teacher: alias, directory or .gguf file")
    ap.add_argument("--methods", default="lolcats,lizard")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3, help="steps of each stage run before the timed ones")
    ap.add_argument("--steps", type=int, default=20, help="timed steps of each stage")
    ap.add_argument("--trace", action="store_true", help="print torch.profiler's top operators of each stage")
    ap.add_argument("--trace-steps", type=int, default=3)
    ap.add_argument("--stages", default="transfer,lora", help="which stages to time (transfer, lora)")
    add_tuning_option(ap)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    stages = tuple(x.strip() for x in a.stages.split(",") if x.strip())
    if not stages or any(x not in ("transfer", "lora") for x in stages):
        raise SystemExit("--stages takes transfer, lora or both")
    for flag in ("seq_len", "batch_size", "steps", "trace_steps"):
        if getattr(a, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1")
    from attnswap.kernels.linear_attn import chunk as linear_chunk

    apply_tuning(a.tuning)
    dev = loading.pick_device(a.device)
    dtype = loading.pick_dtype("auto", dev)
    teacher, _ = loading.load_model(loading.resolve(a.model), dtype=dtype, device=dev)
    cfg = teacher.config
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(100, cfg.vocab_size - 1, (4 * a.batch_size, a.seq_len), generator=g)
    t_share, l_share = split_steps(1000, None, None)
    tokens = a.batch_size * a.seq_len
    print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else dev}, dtype {dtype}, commit {_commit()}, "
          f"rows {a.batch_size} x {a.seq_len}")
    rows = []
    for method in a.methods.split(","):
        model = copy.deepcopy(teacher)
        name, opts = method_spec(method)
        convert_model(model, [make_swap(name, list(range(cfg.num_hidden_layers)), opts, cfg)], source=a.model)
        model.to(dev, dtype)
        t = time_stages(model, seqs, a.batch_size, a.warmup, a.steps, stages)
        nan = float("nan")
        tt, tl = t.get("transfer", nan), t.get("lora", nan)
        row = {"method": method, "seq_len": a.seq_len, "batch_size": a.batch_size, "steps": a.steps,
               "transfer_ms": 1e3 * tt, "lora_ms": 1e3 * tl, "transfer_tok_s": tokens / tt, "lora_tok_s": tokens / tl,
               "steps_1000_s": t_share * tt + l_share * tl, "graph_steps": t["graph_steps"], "update_ms": t["update_ms"],
               "fused_adamw": bool(adamw([torch.nn.Parameter(torch.zeros(1, device=dev))], 1e-3).defaults["fused"]),
               "peak_gib": t["peak_gib"], "chunked_loss": logit_loss.wanted(),
               "tuning": {k: linear_chunk.TUNING[k] for k in ("bwd_segments", "bwd_segments_max_per_sm", "bwd_sink_split")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.trace:
            trace_stages(model, seqs, a.batch_size, a.trace_steps)
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{'method':12s} {'transfer ms/step':>17s} {'tok/s':>9s} {'lora ms/step':>13s} {'tok/s':>9s} {'1000 steps s':>13s}"
          f" {'update ms t/l':>14s}")
    for r in rows:
        u = r["update_ms"]
        print(f"{r['method']:12s} {r['transfer_ms']:17.1f} {r['transfer_tok_s']:9,.0f} {r['lora_ms']:13.1f} "
              f"{r['lora_tok_s']:9,.0f} {r['steps_1000_s']:13.1f} {u.get('transfer', float('nan')):6.2f} / {u.get('lora', float('nan')):.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"commit": _commit(), "device": str(dev), "dtype": str(dtype), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
