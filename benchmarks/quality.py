"""Conversion-quality suite: held-out perplexity and recall of a converted model against its teacher.

Three ways in:

    # run a conversion (arguments after -- go to `convert linearize` / `convert gqa`), then evaluate it
    python benchmarks/quality.py --model llama --convert linearize --out runs/q-lolcats -- --steps 1000
    python benchmarks/quality.py --model llama --convert linearize --out runs/q-lizard -- --attention lizard --steps 1000
    python benchmarks/quality.py --model llama --convert gqa --out runs/q-mqa -- --kv-heads 1 --train all --steps 1000
    python benchmarks/quality.py --model llama --convert sparsify --out runs/q-seer -- --method seer --steps 1000

    # evaluate a model converted earlier
    python benchmarks/quality.py --model llama --candidate runs/q-lolcats

    # gqa: perplexity right after merging, before any training, for every merge variant
    python benchmarks/quality.py --model llama --gqa-merges --kv-heads 1

The conversion runs the project's own command (``python -m attnswap.cli linearize|gqa ... --json``) and
reports its wall time and the perplexities it printed; the evaluation is ``attnswap.evals.compare``
(what ``convert eval`` runs) with the candidate against the teacher on the same held-out data and
prompts. The defaults are the settings of the published figures (docs/BENCHMARKS.md): perplexity in
512/1024/2048/8192-token windows on the in-domain held-out split of ``--data`` and, again, on the
out-of-domain set ``--ood-data`` (text from sources training never reads), passkey at 1k-8k (5 depths
x 10 samples), MQAR at 4-64 pairs. ``--sparsity`` evaluates a sparsified model at another sparsity.
``--tasks none`` skips the evaluation. ``--sample`` also prints a greedy continuation from the saved model.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from _common import commit as _commit  # noqa: E402  (benchmarks/_common.py)



def _device_name(device: str) -> str:
    import torch

    from attnswap import loading

    dev = loading.pick_device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)


def _numbers(text: str | None, kind=int):
    return None if text is None else [kind(x) for x in text.split(",") if x.strip()]


def convert(a, extra: list[str]) -> tuple[Path, dict]:
    """Run `convert linearize|gqa|sparsify` as a user would; returns (output directory, its --json summary)."""
    out = Path(a.out or f"runs/quality-{a.convert}")
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "attnswap.cli", a.convert, "--model", a.model, "--out", str(out), "--overwrite",
               "--device", a.device, "--json", str(summary), *extra]
        print("$", " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        wall = time.perf_counter() - t0
        if rc != 0:
            sys.exit(f"the conversion failed (exit {rc})")
        report = json.loads(summary.read_text())
    report["command_wall_seconds"] = wall
    return out, report


def print_conversion(r: dict) -> None:
    t = r.get("teacher", {}).get("ppl")
    for key in ("merged", "converted", "distilled"):
        if key in r and t:
            print(f"{key} ppl (held-out, {r[key]['tokens']:,} tokens, {r['seq_len']}-token windows): {r[key]['ppl']:.3f} "
                  f"= {r[key]['ppl'] / t:.3f}x the teacher's {t:.3f}")
    parts = ""
    if r.get("startup_seconds") is not None and r.get("wall_seconds") is not None:
        rest = r["command_wall_seconds"] - r["startup_seconds"] - r["wall_seconds"]
        parts = f" (start-up {r['startup_seconds']:.1f} s, run {r['wall_seconds']:.1f} s, after it {rest:.1f} s)"
    print(f"conversion: {r.get('tokens_seen', 0):,} tokens seen, training {r.get('train_seconds', 0):.0f} s, "
          f"whole command {r['command_wall_seconds']:.0f} s{parts}")


def evaluate(a, candidate: str, data: str | None = None, tasks: str | None = None):
    from attnswap.evals import compare

    tasks = [t.strip() for t in (tasks or a.tasks).split(",") if t.strip()]
    data = data or a.data
    print(f"\n--- {', '.join(tasks)} on --data {data}", flush=True)
    report = compare(candidate, a.model, tasks=tasks, data=data, seq_len=a.seq_len, eval_tokens=a.eval_tokens,
                     device=a.device, ppl_lengths=_numbers(a.ppl_lengths), lengths=_numbers(a.lengths),
                     depths=_numbers(a.depths, float), samples=a.samples, mqar_pairs=_numbers(a.mqar_pairs),
                     sparsity=a.sparsity, command=" ".join(["benchmarks/quality.py", *sys.argv[1:]]))
    rows = report._rows()
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"\n{'metric':{width}s} {'teacher':>10s} {'candidate':>10s} {'change':>11s}")
    for metric, base, cand, change, _ in rows:
        print(f"{metric:{width}s} {base:>10s} {cand:>10s} {change:>11s}")
    c = report.candidate["results"]
    if "passkey" in c:
        for side in (report.baseline, report.candidate):
            pk = side["results"]["passkey"]
            lengths = ", ".join(f"{n}: {v:.0%}" for n, v in pk.get("by_length", {}).items())
            depths = ", ".join(f"{d}: {v:.0%}" for d, v in pk["by_depth"].items())
            print(f"passkey by length, {side['name']}: {lengths}")
            print(f"passkey by depth, {side['name']}: {depths}")
            if "forced_by_length" in pk:
                forced = ", ".join(f"{n}: {v:.0%}" for n, v in pk["forced_by_length"].items())
                print(f"passkey by teacher forcing, by length, {side['name']}: {forced}")
            if "forced_digits_by_length" in pk:
                digits = ", ".join(f"{n}: {v:.0%}" for n, v in pk["forced_digits_by_length"].items())
                print(f"passkey digits by teacher forcing (leading space given), by length, {side['name']}: {digits}")
            if "loose_by_length" in pk:
                loose = ", ".join(f"{n}: {v:.0%}" for n, v in pk["loose_by_length"].items())
                print(f"passkey loose (first number in {pk['loose_tokens']} tokens), by length, {side['name']}: {loose}")
            for miss in pk.get("misses", []):
                print(f"passkey miss, {side['name']}: {miss}")
    if "mqar" in c:
        for side in (report.baseline, report.candidate):
            pairs = ", ".join(f"{p}: {v:.0%}" for p, v in side["results"]["mqar"].get("by_pairs", {}).items())
            print(f"mqar by pairs, {side['name']}: {pairs}")
    if a.report_dir:
        print("report:", report.write(a.report_dir) / "report.md")
    return report


def gqa_merges(a) -> dict:
    """Held-out perplexity right after merging (no training) for mean / aligned merging, each with and
    without the value read-out refit: one load, one calibration (the same data, split, calibration
    batches and windows as `convert gqa`, seed 0)."""
    import torch

    from attnswap import loading
    from attnswap.convert.gqa import calibrate, kv_bytes_per_token, merge_to_gqa
    from attnswap.data import build_corpus, load_documents
    from attnswap.evals.perplexity import perplexity

    dev = loading.pick_device(a.device)
    dt = loading.pick_dtype("auto", dev)
    net, tok = loading.load_model(loading.resolve(a.model), dtype=dt, device=dev)
    corpus = build_corpus(load_documents(a.data), tok)
    train = corpus.sequences("train", a.seq_len)
    held = corpus.sequences("heldout", a.seq_len)[: max(1, a.eval_tokens // a.seq_len)]
    batch = 8
    pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))[: a.calib_batches * batch]
    stats = calibrate(net, [train[pick[i : i + batch]] for i in range(0, pick.numel(), batch)])
    res = {"model": a.model, "kv_heads": a.kv_heads, "grouping": a.grouping, "dtype": str(dt),
           "teacher": perplexity(net, held, label="teacher"), "kv_bytes_per_token_before": kv_bytes_per_token(net.config, dt)}
    for merge, refit in (("mean", False), ("mean", True), ("aligned", False), ("aligned", True), ("subspace", False)):
        m = copy.deepcopy(net)
        t = time.perf_counter()
        merge_to_gqa(m, a.kv_heads, grouping=a.grouping, merge=merge, stats=stats, refit=refit)
        key = merge + ("+refit" if refit else "")
        res[key] = perplexity(m, held, label=key) | {"merge_seconds": time.perf_counter() - t}
        res["kv_bytes_per_token_after"] = kv_bytes_per_token(m.config, dt)
        del m
    tp = res["teacher"]["ppl"]
    print(f"teacher ppl {tp:.3f}; KV bytes/token {res['kv_bytes_per_token_before']:,} -> {res['kv_bytes_per_token_after']:,}")
    for k in ("mean", "mean+refit", "aligned", "aligned+refit", "subspace"):
        print(f"{k:14s} ppl {res[k]['ppl']:10.3f}  ({res[k]['ppl'] / tp:.2f}x teacher)")
    return res


def sample(path: str, prompt: str, device: str) -> str:
    """A greedy continuation from the saved model, loaded the way a user loads it."""
    from attnswap import loading

    dev = loading.pick_device(device)
    m, tok = loading.load_model(loading.resolve(path), dtype=loading.pick_dtype("auto", dev), device=dev)
    ids = tok(prompt, return_tensors="pt").to(dev)
    text = tok.decode(m.generate(**ids, max_new_tokens=30, do_sample=False)[0], skip_special_tokens=True)
    print("sample:", text)
    return text


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama", help="the teacher: alias, directory or .gguf file")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--convert", choices=("linearize", "gqa", "sparsify"), help="run this conversion of --model, then evaluate it")
    what.add_argument("--candidate", help="evaluate this converted model directory against --model")
    what.add_argument("--gqa-merges", action="store_true", help="gqa: perplexity after each merge variant, no training")
    ap.add_argument("--out", help="--convert: output directory (default runs/quality-<command>)")
    ap.add_argument("--tasks", default="ppl,passkey,mqar", help="evaluation tasks (ppl, passkey, niah, mqar, speed) or none")
    ap.add_argument("--data", default="general", help="evaluation data: its in-domain held-out split is scored")
    ap.add_argument("--ood-data", default="general:ood", help="perplexity again on this out-of-domain set ('none' skips it)")
    ap.add_argument("--sparsity", type=float, help="evaluate a sparsified model at this sparsity instead of its saved one")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--ppl-lengths", default="512,1024,2048,8192")
    ap.add_argument("--lengths", default="1024,2048,4096,8192", help="passkey/niah prompt lengths")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--mqar-pairs", default="4,8,16,32,64")
    ap.add_argument("--report-dir", help="also write the eval report (report.md/json, plots) here")
    ap.add_argument("--kv-heads", type=int, default=1, help="--gqa-merges: KV heads to merge to")
    ap.add_argument("--grouping", default="similarity", help="--gqa-merges: similarity or adjacent")
    ap.add_argument("--calib-batches", type=int, default=4, help="--gqa-merges: calibration batches of 8 sequences")
    ap.add_argument("--sample", metavar="PROMPT", help="print a greedy continuation of PROMPT from the converted model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", help="write everything measured here")
    a = ap.parse_args(argv)
    if extra and not a.convert:
        ap.error("arguments after -- go to the conversion; they need --convert")

    print(f"device {_device_name(a.device)}, attnswap commit {_commit()}", flush=True)
    out: dict = {"commit": _commit(), "device": _device_name(a.device), "argv": sys.argv[1:]}
    if a.gqa_merges:
        out["merges"] = gqa_merges(a)
    else:
        candidate = a.candidate
        if a.convert:
            path, conv = convert(a, extra)
            print_conversion(conv)
            out["conversion"], candidate = conv, str(path)
        if a.tasks != "none":
            out["eval"] = evaluate(a, candidate).to_dict()
            if a.ood_data != "none" and "ppl" in a.tasks.split(","):
                out["eval_ood"] = evaluate(a, candidate, data=a.ood_data, tasks="ppl").to_dict()
        if a.sample:
            out["sample"] = sample(candidate, a.sample, a.device)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
