"""Where a converted model's time goes: one attention layer and the whole model, profiled.

For each method (the teacher's own attention, then each conversion, made untrained from the teacher
with default options) and each length L:
- ``layer fwd ms`` / ``layer fwd+bwd ms``: one attention module (projections, feature maps, RoPE,
  the kernel, casts, the output projection) on random hidden states (B=1), median of ``--repeats``;
  the backward is the one training runs (student mode, gradients into the weights);
- ``model fwd ms``: a whole-model forward without a cache over L random tokens, and that time
  divided by the number of layers (``per layer``): the difference to the layer figure is the rest of
  the decoder layer (MLP, norms) and the model's own overhead;
- ``model prefill ms``: a whole-model forward into a fresh cache with an all-ones mask and
  ``logits_to_keep=1``, what ``benchmarks/generation.py``'s prefill runs;
- ``chunked prefill ms`` (when L > ``--chunk``): the same prompt fed in ``--chunk``-token pieces into one
  cache, what ``generate()`` does by default for a converted model (``prefill_chunk``, 2048); every
  piece after the first continues from the cache; ``pieces vs one pass``: the relative difference of
  the last token's logits the two ways, and whether their argmax agrees;
- with ``--trace``, the top operators of one layer's forward+backward from ``torch.profiler``,
  by device time (CUDA) or CPU time, so fusions and copies can be seen by name; and of the whole-model
  prefill, by self host time and by self device time (where the host spends its time between
  launches); ``--trace-dir`` also writes each prefill's Chrome trace there (gzipped);
- ``prefill host ms``: the same prefill timed to the return of the call, before the device has
  finished (it was idle at the start): the time the host takes to issue the work; close to ``prefill
  ms`` means the host bounds the prefill;
- a second table sets the host against the device, one attention layer and the whole model, each
  without a cache and into a fresh one (``layer prefill``: the module's output and, for a conversion,
  its decoding state): ``host`` is the time to the call's return with the device idle at the start;
- with ``--prefill-graph cuda``, a third table: each conversion's prefill again in fixed ``--piece``-token
  pieces replayed as CUDA graphs (``modeling/prefill.py``, the runtime option ``prefill_graph``), in the
  same run, with its host time and its agreement with one pass (``static``: the same pieces uncaptured);
- with ``--pyprof``, Python's cProfile of one prefill (after the timing runs): the functions that take
  the host's time, by self time and by cumulative time (cProfile slows every Python call, so read the
  shares, not the times);
- a method may carry options other than its defaults (``lolcats:window=256``), or be a saved conversion's directory (a trained model) in place of a method name;
- with ``--syncs --stub-launches`` (no GPU needed): the same counts on the Triton path, in bf16, with every
  Triton launch replaced by a no-op, so what the host issues on a GPU can be counted on a CPU (the
  outputs are garbage; only the counts are read);
- with ``--syncs``, host-device synchronisations and ATen calls (``attnswap.profiling``) of the layer's
  forward, its forward+backward, the whole model's forward without a cache and its prefill into a
  cache (with an all-ones mask, as ``generate()`` passes): the host-side overhead, countable on CPU.

    python benchmarks/profile_layer.py --model llama --lengths 4096,32768 --methods teacher,lolcats,lizard --trace
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--stub-launches" in sys.argv:  # before any Triton kernel is defined: interpreted kernels need no GPU driver
    os.environ["ATTNSWAP_KERNELS"] = "triton"
    os.environ["TRITON_INTERPRET"] = "1"

import torch

import attnswap  # noqa: F401  (registers converted models)
from attnswap import loading
from attnswap.convert.base import attention_mode
from attnswap.convert.swap import make_swap
from attnswap.hf_compat import cache_kwargs, new_cache
from attnswap.modeling import convert_model
from attnswap.profiling import count_host_ops
from _common import add_tuning_option, apply_tuning, commit as _commit, method_spec, stub_triton_launches  # noqa: E402  (benchmarks/_common.py)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, repeats: int) -> float:
    fn()  # warm-up: compilation, autotuning, allocator
    _sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def layer_inputs(model, L: int, dev, dtype):
    g = torch.Generator().manual_seed(L)
    h = torch.randn(1, L, model.config.hidden_size, generator=g).to(dev, dtype)
    pos = torch.arange(L, device=dev)[None]
    cos, sin = model.model.rotary_emb(h, pos)
    return h, (cos, sin)


def host_counts(model, fns: dict) -> dict:
    """Syncs and ATen calls of each ``fns`` entry (after one uncounted call)."""
    out = {}
    for key, fn in fns.items():
        fn()
        r = count_host_ops(fn)[1]
        out[key] = {"syncs": r.syncs, "aten_ops": r.ops}
    return out


def _issue_ms(fn, dev, repeats: int) -> float:
    """Median time to the return of ``fn`` with the device idle at the start (no sync before returning)."""
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        _sync(dev)
    return 1e3 * statistics.median(times)


def _pyprof(fn, what: str, rows: int = 25):
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats(key).print_stats(rows)
        body = buf.getvalue()
        print(f"\n--- {what}, cProfile by {key}\n{body[body.find('   ncalls'):]}", flush=True)


def profile(model, name: str, L: int, dev, dtype, repeats: int, trace: bool, syncs: bool = False,
            trace_dir: str | None = None, chunk: int = 2048, pyprof: bool = False, graph: str | None = None,
            piece: int = 2048) -> dict:
    attn = model.model.layers[0].self_attn
    h, pe = layer_inputs(model, L, dev, dtype)
    hg = h.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            attn(h, position_embeddings=pe, attention_mask=None)

    def layer_prefill():  # the same module into a fresh cache: for a conversion, output and decoding state
        with torch.no_grad():
            attn(h, position_embeddings=pe, attention_mask=None, use_cache=True, **cache_kwargs(new_cache(model.config)))

    def fwd_bwd():
        out = attn(hg, position_embeddings=pe, attention_mask=None)[0]
        out.float().square().mean().backward()

    ids = torch.randint(100, model.config.vocab_size - 1, (1, L), generator=torch.Generator().manual_seed(L)).to(dev)

    def whole():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def prefill():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                         **cache_kwargs(new_cache(model.config))).logits

    def chunked():
        with torch.no_grad():
            cache = new_cache(model.config)
            for a in range(0, L, chunk):
                piece = ids[:, a : a + chunk]
                pos = torch.arange(a, a + piece.shape[1], device=dev)[None]
                out = model(input_ids=piece, position_ids=pos, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
            return out.logits

    with attention_mode(model, "student"):
        if syncs:
            fns = {"layer_fwd": fwd, "layer_fwd_bwd": fwd_bwd, "model_fwd": whole, "model_prefill": prefill}
            if L > chunk:
                fns["chunked_prefill"] = chunked
            counts = host_counts(model, fns)
            for p_ in attn.parameters():
                p_.grad = None
            return {"method": name, "L": L, "counts": counts}
        row = {"method": name, "L": L, "layer_fwd_ms": _timed(fwd, dev, repeats),
               "layer_fwd_bwd_ms": _timed(fwd_bwd, dev, repeats), "model_fwd_ms": _timed(whole, dev, repeats),
               "model_prefill_ms": _timed(prefill, dev, repeats)}
        row["prefill_host_ms"] = _issue_ms(prefill, dev, repeats)
        row["model_fwd_host_ms"] = _issue_ms(whole, dev, repeats)
        row["layer_prefill_ms"] = _timed(layer_prefill, dev, repeats)
        row["layer_fwd_host_ms"] = _issue_ms(fwd, dev, repeats)
        row["layer_prefill_host_ms"] = _issue_ms(layer_prefill, dev, repeats)
        if L > chunk:
            row["chunked_prefill_ms"] = _timed(chunked, dev, repeats)
            # the same last-token logits both ways (another code path computes the later pieces)
            one, pieces = prefill().float(), chunked().float()
            row["chunked_vs_one_pass"] = {"max_abs": (one - pieces).abs().max().item(),
                                          "rel": ((one - pieces).norm() / one.norm()).item(),
                                          "same_argmax": bool(torch.equal(one.argmax(-1), pieces.argmax(-1)))}
        if graph and name != "teacher" and L >= piece:  # the prefill in fixed pieces replayed as graphs (prefill.py)
            usual = model.attnswap_runtime
            model.attnswap_runtime = dataclasses.replace(usual, prefill_graph=graph, prefill_piece=piece)
            try:
                row["graph_prefill_ms"] = _timed(prefill, dev, repeats)
                row["graph_prefill_host_ms"] = _issue_ms(prefill, dev, repeats)
                plans = [p for p in model.__dict__.get("_attnswap_prefill_plans", {}).values() if p]
                row["graph_pieces"] = sorted({f"{k}:{n}" for p in plans for k, n, _ in p.pieces})
                graphed = prefill().float()
            finally:
                model.attnswap_runtime = usual
            one = prefill().float()
            row["graph_vs_one_pass"] = {"max_abs": (one - graphed).abs().max().item(),
                                        "rel": ((one - graphed).norm() / one.norm()).item(),
                                        "same_argmax": bool(torch.equal(one.argmax(-1), graphed.argmax(-1)))}
        row["model_fwd_per_layer_ms"] = row["model_fwd_ms"] / model.config.num_hidden_layers
        if pyprof:
            _pyprof(prefill, f"{name}, L={L}: whole-model prefill into a cache")
            _sync(dev)
        if trace:
            _trace(fwd_bwd, dev, f"{name}, L={L}: one layer forward+backward", 18)
            _trace(prefill, dev, f"{name}, L={L}: whole-model prefill into a cache", 30, by_self=True,
                   path=f"{trace_dir}/prefill-{name}-{L}.json" if trace_dir else None)
    for p_ in attn.parameters():
        p_.grad = None
    return row


def _trace(fn, dev, what: str, rows: int, by_self: bool = False, path: str | None = None):
    """Print torch.profiler's top operators of one call of ``fn`` (after the timing runs warmed it)."""
    import gzip
    import os
    import shutil

    from torch.profiler import ProfilerActivity, profile as prof

    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with prof(activities=acts) as p:
        fn()
        _sync(dev)
    keys = (["self_cpu_time_total"] + (["self_cuda_time_total"] if cuda else [])) if by_self else \
        ["cuda_time_total" if cuda else "cpu_time_total"]
    for key in keys:
        table = p.key_averages().table(sort_by=key, row_limit=rows)
        print(f"\n--- {what}, top operators by {key}\n{table}", flush=True)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        p.export_chrome_trace(path)
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama", help="the teacher: alias, directory or .gguf file")
    ap.add_argument("--methods", default="teacher,lolcats,lizard")
    ap.add_argument("--lengths", default="4096,32768")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trace", action="store_true", help="print torch.profiler's top operators per method and length")
    ap.add_argument("--trace-dir", default=None, help="with --trace: write each prefill's Chrome trace here (.json.gz)")
    ap.add_argument("--pyprof", action="store_true", help="print cProfile's top functions of one prefill per method and length")
    ap.add_argument("--syncs", action="store_true",
                    help="count host syncs and ATen calls (layer, whole model, prefill) instead of timing")
    ap.add_argument("--stub-launches", action="store_true",
                    help="with --syncs: the Triton path in bf16 with every kernel launch a no-op (counts on a CPU)")
    ap.add_argument("--chunk", type=int, default=2048,
                    help="piece size of the chunked prefill (generate()'s default prefill_chunk); lengths above it are also timed that way")
    ap.add_argument("--prefill-graph", default=None, choices=("cuda", "static"),
                    help="also time each conversion's prefill in fixed pieces replayed as CUDA graphs (cuda) or run "
                         "on their static buffers (static, any device), in the same run (modeling/prefill.py)")
    ap.add_argument("--piece", type=int, default=2048, help="with --prefill-graph: the piece (prefill_piece)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sum-split-from", type=int, default=None,
                    help="linear keys from which a prefill's state sums run in pieces (hybrid_attn/step_torch.py: "
                         "SUM_SPLIT_FROM); a large value turns the split off, for a same-run comparison")
    add_tuning_option(ap)
    a = ap.parse_args()
    tuning = apply_tuning(a.tuning)
    if a.sum_split_from is not None:
        from attnswap.kernels.hybrid_attn import step_torch

        step_torch.SUM_SPLIT_FROM = a.sum_split_from
    if a.stub_launches and not a.syncs:
        raise SystemExit("--stub-launches only counts (--syncs): its kernels compute nothing")
    dev = loading.pick_device(a.device)
    dtype = loading.pick_dtype("auto", dev)
    if a.stub_launches:
        stub_triton_launches()
        dtype = torch.bfloat16
    teacher, _ = loading.load_model(loading.resolve(a.model), dtype=dtype, device=dev)
    lengths = [int(x) for x in a.lengths.split(",")]
    print(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else dev}, dtype {dtype}, commit {_commit()}")
    rows = []
    for method in a.methods.split(","):
        if method == "teacher":
            model = teacher
        elif Path(method).expanduser().is_dir():  # a saved conversion
            model, _ = loading.load_model(loading.resolve(str(Path(method).expanduser())), dtype=dtype, device=dev)
            method = Path(method).name
        else:
            model = copy.deepcopy(teacher)
            cfg = model.config
            name, opts = method_spec(method)  # e.g. lolcats:window=256
            convert_model(model, [make_swap(name, list(range(cfg.num_hidden_layers)), opts, cfg)], source=a.model)
            model.to(dev, dtype)
        for L in lengths:
            try:
                row = profile(model, method, L, dev, dtype, a.repeats, a.trace, a.syncs, a.trace_dir, a.chunk, a.pyprof,
                              a.prefill_graph, a.piece)
            except torch.OutOfMemoryError:
                row = {"method": method, "L": L, "error": "out of memory"}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if model is not teacher:
            del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if a.syncs:
        nl = teacher.config.num_hidden_layers
        print(f"\nhost syncs / ATen calls ({nl} layers)\n{'method':10s} {'L':>6s} {'layer fwd':>12s} "
              f"{'layer fwd+bwd':>14s} {'model fwd':>12s} {'prefill':>12s} {'chunked prefill':>16s} {'model ops/layer':>16s}")
        for r in rows:
            if "error" in r:
                print(f"{r['method']:10s} {r['L']:6d} {r['error']}")
                continue
            c = r["counts"]
            cell = lambda k: f"{c[k]['syncs']} / {c[k]['aten_ops']}"  # noqa: E731
            print(f"{r['method']:10s} {r['L']:6d} {cell('layer_fwd'):>12s} {cell('layer_fwd_bwd'):>14s} "
                  f"{cell('model_fwd'):>12s} {cell('model_prefill'):>12s} "
                  f"{cell('chunked_prefill') if 'chunked_prefill' in c else '-':>16s} {c['model_fwd']['aten_ops'] / nl:16.1f}")
    else:
        _timing_table(rows)
        _host_table(rows)
        _graph_table(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"commit": _commit(), "device": str(dev), "dtype": str(dtype), "tuning": tuning, "rows": rows}, f,
                      indent=2)


def _timing_table(rows):
    print(f"\n{'method':10s} {'L':>6s} {'layer fwd ms':>13s} {'layer fwd+bwd ms':>17s} {'model fwd ms':>13s} {'per layer':>10s}"
          f" {'prefill ms':>11s} {'host ms':>8s} {'prefill tok/s':>14s} {'chunked ms':>11s} {'chunked tok/s':>14s} {'pieces vs one pass':>19s}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:10s} {r['L']:6d} {r['error']}")
            continue
        print(f"{r['method']:10s} {r['L']:6d} {r['layer_fwd_ms']:13.3f} {r['layer_fwd_bwd_ms']:17.3f} "
              f"{r['model_fwd_ms']:13.2f} {r['model_fwd_per_layer_ms']:10.3f} {r['model_prefill_ms']:11.2f}"
              f" {r.get('prefill_host_ms', float('nan')):8.2f} {1e3 * r['L'] / r['model_prefill_ms']:14,.0f}"
              + (f" {r['chunked_prefill_ms']:11.2f} {1e3 * r['L'] / r['chunked_prefill_ms']:14,.0f}" if "chunked_prefill_ms" in r else "")
              + (f" {_agree(r['chunked_vs_one_pass']):>19s}" if "chunked_vs_one_pass" in r else ""))


def _graph_table(rows):
    """The prefill one pass against fixed pieces replayed as graphs, same run."""
    rows = [r for r in rows if "graph_prefill_ms" in r]
    if not rows:
        return
    print(f"\n{'method':10s} {'L':>6s} {'prefill ms':>11s} {'host':>7s} {'graphed ms':>11s} {'host':>7s} {'speed-up':>9s}"
          f" {'graphed tok/s':>14s} {'graphed vs one pass':>20s}  pieces")
    for r in rows:
        print(f"{r['method']:10s} {r['L']:6d} {r['model_prefill_ms']:11.2f} {r['prefill_host_ms']:7.2f}"
              f" {r['graph_prefill_ms']:11.2f} {r['graph_prefill_host_ms']:7.2f}"
              f" {r['model_prefill_ms'] / r['graph_prefill_ms']:8.2f}x {1e3 * r['L'] / r['graph_prefill_ms']:14,.0f}"
              f" {_agree(r['graph_vs_one_pass']):>20s}  {' '.join(r['graph_pieces'])}")


def _host_table(rows):
    """Host against device, with and without a cache: where a prefill's extra time comes from."""
    rows = [r for r in rows if "layer_prefill_ms" in r]
    if not rows:
        return
    print(f"\n{'method':10s} {'L':>6s} {'layer fwd ms':>13s} {'host':>7s} {'layer prefill ms':>17s} {'host':>7s}"
          f" {'model fwd ms':>13s} {'host':>7s} {'prefill ms':>11s} {'host':>7s}")
    for r in rows:
        print(f"{r['method']:10s} {r['L']:6d} {r['layer_fwd_ms']:13.3f} {r['layer_fwd_host_ms']:7.3f}"
              f" {r['layer_prefill_ms']:17.3f} {r['layer_prefill_host_ms']:7.3f} {r['model_fwd_ms']:13.2f}"
              f" {r['model_fwd_host_ms']:7.2f} {r['model_prefill_ms']:11.2f} {r['prefill_host_ms']:7.2f}")


def _agree(c: dict) -> str:
    return f"{c['rel']:.1e}" + (" same" if c["same_argmax"] else " DIFFERENT")


if __name__ == "__main__":
    main()
