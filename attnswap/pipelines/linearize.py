"""``convert linearize``: swap softmax attention for learnable linear + sliding-window attention
(lolcats, lizard), then distil in two stages (attention transfer, then LoRA against the teacher's logits).

``--exact-heads N`` (N > 0) keeps N KV heads of the whole model exact softmax attention over the full
context (mixed layers, ``convert/base.py``), chosen by calibration between the two stages: after
attention transfer every KV head mixes exact and linear attention with a learned alpha
(``distill/calibrate.py``, per head) on retrieval-bearing text; the N heads with the highest alpha stay
exact, the others become the linear method for good; then LoRA. ``--steps`` is then split
``TRANSFER_SHARE`` / ``CALIB_SHARE`` / the rest (40% / 10% / 50%); ``--transfer-steps``,
``--calib-steps`` and ``--lora-steps`` override their stage (an unset stage takes what is left).
``--exact-heads auto`` takes the smallest N, in the order of the alphas, whose model (before LoRA)
recalls at least ``--recall-floor`` of what the teacher recalls on the calibration probe: the answer
tokens of the calibration rows that carry retrieval, predicted greedily (``answer_recall``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AttnSwapError
from ..progress import console
from .common import (Clock, RunConfig, check_convertible, check_positive, check_share, check_seq_len,
                     load_for_training, plan_training_outputs, require_text, resume_command,
                     retrieval_mix, save_run, sharded_launch, tokens_hash)

# the attention options' flags, for the refusal of one the method does not take
METHOD_FLAGS = {"window": "--window", "feature_dim": "--feature-dim", "meta_tokens": "--meta-tokens",
                "sinks": "--sinks", "feature_rope": "--feature-rope"}


TRANSFER_SHARE = 0.4  # of --steps: attention transfer
CALIB_SHARE = 0.1  # of --steps, with --exact-heads: calibration of the per-head alphas (the rest is LoRA)
CALIB_RETRIEVAL = 0.5  # share of calibration rows carrying retrieval when --retrieval-mix is 0
# --retrieval-mix by default with --exact-heads: without such rows the LoRA stage never shows the exact heads a
# fact to fetch (lizard, 9 exact heads: passkey at 1k / 2k 0 / 17% without, 100 / 100% with; docs/BENCHMARKS.md)
EXACT_RETRIEVAL_MIX = 0.25
KV_REPORT_LENGTH = 8192  # the KV cache is also reported for a sequence this long


@dataclass
class LinearizeConfig(RunConfig):
    attention: str = "lolcats"
    seq_len: int | None = None  # default: the method's training rows (default_rows)
    batch_size: int | None = None  # default: STEP_TOKENS // seq_len
    window: int | None = None  # default: the method's (256 for lolcats and lizard)
    meta_tokens: int | None = None
    feature_dim: int | None = None
    layers: str = "all"
    keep_softmax: str = ""
    transfer_steps: int | None = None  # default: 40% of steps
    lora_steps: int | None = None  # default: the rest of steps
    lr: float = 1e-3
    transfer_lr: float = 1e-2
    lora_rank: int = 8
    ce_weight: float = 0.0
    lora_feature_maps: bool = True
    retrieval_mix: float | None = None  # share of training rows carrying retrieval (synthetic.py); None: 0, or
    # EXACT_RETRIEVAL_MIX with --exact-heads
    sinks: int | None = None
    feature_rope: bool | None = None
    exact_heads: int | str = 0  # KV heads of the whole model kept exact softmax (calibrated); 0: none
    calib_steps: int | None = None  # with --exact-heads: default CALIB_SHARE of steps
    recall_floor: float = 0.9  # --exact-heads auto: share of the teacher's recall on the calibration probe
    exact_heads_by: str = "alpha"  # rank heads for --exact-heads by calibrated alpha, or by the retrieval probe
    calib_loss: str = "all"  # --exact-heads' calibration: KL on every token ("all") or on the answer tokens ("answers")


AUTO = "auto"
CALIB_LOSS = ("all", "answers")  # --calib-loss: what calibration distils (distill/calibrate.py: answers_only)
RANK_BY = ("alpha", "probe")  # --exact-heads-by: calibrated alpha, or the teacher's attention on facts (evals/probe)
STEP_TOKENS = 8192  # tokens a training step takes unless --batch-size says otherwise
# Training rows by method, unless --seq-len says otherwise. lolcats' linear part, which has no decay, learns to
# weigh a long history only from long rows: on rows of 4,096 SmolLM2's 8k out-of-domain perplexity went from
# 1.141x to 1.069x the teacher's at 1000 steps; lizard met its targets on rows of 1,024 (docs/BENCHMARKS.md).
SEQ_LEN = {"lolcats": 4096}
SEQ_LEN_OTHERS = 1024


def default_rows(attention: str, seq_len: int | None, batch_size: int | None, max_positions: int | None):
    """(seq_len, batch_size) with the defaults filled in: the method's row length (at most the model's
    maximum) and as many rows as make STEP_TOKENS a step."""
    if seq_len is None:
        seq_len = SEQ_LEN.get(attention, SEQ_LEN_OTHERS)
        if max_positions:
            seq_len = min(seq_len, max_positions)
    if batch_size is None:
        batch_size = max(1, STEP_TOKENS // seq_len)
    return seq_len, batch_size


PROBE_ROWS = 16  # --exact-heads auto: retrieval rows of the calibration mix that the recall probe reads


def parse_exact_heads(value) -> int | str | tuple:
    """--exact-heads: a non-negative integer, 'auto', or the heads themselves as LAYER.HEAD items
    ('3.1,20.0': a tuple of (layer, KV head), in the order given, without repeats)."""
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    if "." in text:
        units = []
        for item in text.split(","):
            layer, _, head = item.strip().partition(".")
            if not (layer.isdigit() and head.isdigit()):
                raise AttnSwapError(f"--exact-heads: {item.strip()[:20]!r} is not LAYER.HEAD (e.g. 3.1, KV head 1 of "
                                    "layer 3)")
            if (int(layer), int(head)) in units:
                raise AttnSwapError(f"--exact-heads names {item.strip()} twice")
            units.append((int(layer), int(head)))
        return tuple(units)
    try:
        n = int(text)
    except ValueError:
        raise AttnSwapError(f"--exact-heads takes a non-negative integer (got {str(value)[:40]!r})") from None
    if n < 0:
        raise AttnSwapError(f"--exact-heads must not be negative (got {n})")
    return n


def split_exact_steps(steps: int, transfer: int | None, calib: int | None, lora: int | None) -> tuple[int, int, int]:
    """--steps with --exact-heads: TRANSFER_SHARE transfer, CALIB_SHARE calibration (at least one step
    each), the rest LoRA. A stage's own flag wins; an unset transfer or LoRA stage takes what is left."""
    if calib is None:
        calib = max(1, round(steps * CALIB_SHARE))
    if transfer is None and lora is None:
        transfer = max(1, round(steps * TRANSFER_SHARE))
        lora = max(0, steps - transfer - calib)
    elif transfer is None:
        transfer = max(0, steps - calib - lora)
    elif lora is None:
        lora = max(0, steps - transfer - calib)
    return transfer, calib, lora


def method_options(method: str, **given) -> dict:
    """The attention options given (None: not given); one that ``method`` does not take is refused
    (it would be saved into a config that no loader accepts)."""
    from ..convert import METHODS
    from ..convert.spec import option_names

    if method not in METHODS:
        raise AttnSwapError(f"unknown attention method {method!r}; available: {', '.join(sorted(METHODS))}")
    options = {k: v for k, v in given.items() if v is not None}
    takes = option_names(method)
    for k in options:
        if takes is not None and k not in takes:
            users = sorted(m for m in METHODS if k in (option_names(m) or ()))
            only = f" (it is a {', '.join(users)} option)" if users else ""
            raise AttnSwapError(f"{METHOD_FLAGS.get(k, k)} does not apply to --attention {method}{only}")
    return options


def run(cfg: LinearizeConfig) -> dict | None:
    """Convert, distil, evaluate, save. Returns the report (None on non-main processes)."""
    from .. import loading
    from ..convert import parse_layers
    from ..convert.swap import make_swap
    from ..distill.checkpoint import TrainingRun, use_run
    from ..distill.train import DistillConfig, distill, split_steps
    from ..evals.perplexity import perplexity
    from ..modeling import convert_model

    clock = Clock()
    perplexity = clock.timed("evaluation", perplexity)
    require_text(model=cfg.model, data=cfg.data)
    check_positive(steps=cfg.steps, window=cfg.window, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                   feature_dim=cfg.feature_dim, lora_rank=cfg.lora_rank)
    if any(v is not None and v < 0 for v in (cfg.transfer_steps, cfg.lora_steps)):
        raise AttnSwapError("--transfer-steps and --lora-steps must not be negative")
    n_exact = parse_exact_heads(cfg.exact_heads)
    given = n_exact if isinstance(n_exact, tuple) else None  # the heads named on the command line
    if given:
        n_exact = len(given)
        if "exact_heads_by" in cfg.given:
            raise AttnSwapError("--exact-heads-by ranks heads for a count; --exact-heads names them here")
    if cfg.retrieval_mix is None:
        cfg.retrieval_mix = EXACT_RETRIEVAL_MIX if n_exact else 0.0
    if n_exact:
        check_positive(calib_steps=cfg.calib_steps)
        n_transfer, n_calib, n_lora = split_exact_steps(cfg.steps, cfg.transfer_steps, cfg.calib_steps, cfg.lora_steps)
    elif cfg.calib_steps is not None:
        raise AttnSwapError("--calib-steps applies only with --exact-heads")
    else:
        n_transfer, n_lora = split_steps(cfg.steps, cfg.transfer_steps, cfg.lora_steps)
        n_calib = 0
    if n_exact == AUTO and not 0.0 < cfg.recall_floor <= 1.0:
        raise AttnSwapError(f"--recall-floor must be in (0, 1] (got {cfg.recall_floor})")
    if n_exact != AUTO and "recall_floor" in cfg.given:
        raise AttnSwapError("--recall-floor applies only with --exact-heads auto")
    if cfg.exact_heads_by not in RANK_BY:
        raise AttnSwapError(f"--exact-heads-by is one of {', '.join(RANK_BY)} (got {cfg.exact_heads_by!r})")
    if not n_exact and "exact_heads_by" in cfg.given:
        raise AttnSwapError("--exact-heads-by applies only with --exact-heads")
    if cfg.calib_loss not in CALIB_LOSS:
        raise AttnSwapError(f"--calib-loss is one of {', '.join(CALIB_LOSS)} (got {cfg.calib_loss!r})")
    if not n_exact and "calib_loss" in cfg.given:
        raise AttnSwapError("--calib-loss applies only with --exact-heads")
    check_share("--retrieval-mix", cfg.retrieval_mix)
    for flag, v in (("--sinks", cfg.sinks), ("--meta-tokens", cfg.meta_tokens)):
        if v is not None and v < 0:
            raise AttnSwapError(f"{flag} must not be negative (got {v})")
    options = method_options(cfg.attention, window=cfg.window, feature_dim=cfg.feature_dim,
                             meta_tokens=cfg.meta_tokens, sinks=cfg.sinks, feature_rope=cfg.feature_rope)
    out = cfg.out or cfg.default_out(cfg.attention)
    ckpts = plan_training_outputs(cfg, out)
    # --exact-heads calibrates per head between the stages, unsharded: not under FSDP yet
    shard = sharded_launch(cfg, "linearize --exact-heads" if n_exact else "linearize", supported=not n_exact)

    src = loading.resolve(cfg.model)
    mcfg = loading.load_config(src)
    check_convertible(cfg.model, mcfg)
    cfg.seq_len, cfg.batch_size = default_rows(cfg.attention, cfg.seq_len, cfg.batch_size,
                                               getattr(mcfg, "max_position_embeddings", None))
    check_seq_len(cfg.seq_len, mcfg)
    n_layers = mcfg.num_hidden_layers
    chosen = parse_layers(cfg.layers, n_layers)  # before --keep-softmax: its errors come first
    kept = set(parse_layers(cfg.keep_softmax, n_layers) if cfg.keep_softmax else [])
    chosen = [i for i in chosen if i not in kept]
    if not chosen:
        raise AttnSwapError("no layers left to convert (check --layers and --keep-softmax)")
    swap = make_swap(cfg.attention, chosen, options, mcfg)
    window = swap["options"]["window"]
    if window >= cfg.seq_len:
        console.print(f"warning: the {window}-token window covers every {cfg.seq_len}-token training row, so the linear "
                      "attention gets no training signal; use a --seq-len above the window, or a smaller --window")
    for layer, head in given or ():
        if layer not in chosen or head >= mcfg.num_key_value_heads:
            raise AttnSwapError(f"--exact-heads {layer}.{head}: not a KV head of the converted layers ({len(chosen)} "
                                f"layers of {n_layers}, {mcfg.num_key_value_heads} KV heads each)")
    if n_exact != AUTO and n_exact > len(chosen) * mcfg.num_key_value_heads:
        raise AttnSwapError(f"--exact-heads {n_exact} is more than the {len(chosen) * mcfg.num_key_value_heads} KV "
                            f"heads of the converted layers ({len(chosen)} x {mcfg.num_key_value_heads})")
    loading.check_weight_files(src)  # safetensors only: refused before the data is read, and again before loading

    with clock.phase("loading"):
        ld = load_for_training(cfg.model, src, cfg.device, cfg.dtype, cfg.data, cfg.seq_len, cfg.eval_tokens,
                               tokens_needed=(n_transfer + n_calib + n_lora) * cfg.batch_size * cfg.seq_len)
    net = ld.model
    ckpts.bind({"model": cfg.model, "data": cfg.data, "train_tokens": tokens_hash(ld.train), "swap": swap,
                "transfer_steps": n_transfer, "lora_steps": n_lora, "seq_len": cfg.seq_len,
                "batch_size": cfg.batch_size, "seed": cfg.seed, "dtype": str(ld.dtype), "transfer_lr": cfg.transfer_lr,
                "lr": cfg.lr, "lora_rank": cfg.lora_rank, "ce_weight": cfg.ce_weight,
                "lora_feature_maps": cfg.lora_feature_maps, "retrieval_mix": cfg.retrieval_mix,
                **({"exact_heads": [list(u) for u in given] if given else n_exact, "calib_steps": n_calib,
                    "exact_heads_by": "given" if given else cfg.exact_heads_by,
                    "calib_loss": cfg.calib_loss} if n_exact else {}),
                **({"recall_floor": cfg.recall_floor} if n_exact == AUTO else {})}, cfg.resume)

    calib_rows = calibration_mix(ld, cfg, n_exact) if n_exact else None  # its refusals come before any evaluation
    report: dict = {"model": cfg.model, "attention": cfg.attention, "layers": chosen,
                    "window": swap["options"]["window"],
                    "steps": {"transfer": n_transfer, **({"calibration": n_calib} if n_exact else {}), "lora": n_lora},
                    "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "data": ld.info}
    if shard:
        report["sharded"] = {"method": "FSDP2 fully_shard", "processes": ld.processes}
    if ld.heldout is not None and ld.main:
        report["teacher"] = perplexity(net, ld.heldout, label="teacher perplexity")
    if ld.ood is not None and ld.main:
        report["out_of_domain"] = {"teacher": perplexity(net, ld.ood, label="teacher perplexity (out of domain)")}
    convert_model(net, [swap], source=cfg.model)
    dcfg = DistillConfig(transfer_steps=n_transfer, lora_steps=n_lora, batch_size=cfg.batch_size,
                         transfer_lr=cfg.transfer_lr, lr=cfg.lr, lora_rank=cfg.lora_rank, ce_weight=cfg.ce_weight,
                         seed=cfg.seed, lora_trains_features=cfg.lora_feature_maps)
    mixed, report["retrieval_sequences"] = retrieval_mix(ld.train, ld.tokenizer, cfg.retrieval_mix, cfg.seed)
    report.update(retrieval_mix=cfg.retrieval_mix, training_sequences=ld.train.shape[0])  # training only
    hint = resume_command(cfg.command, "linearize")
    with use_run(TrainingRun(ckpts, max_retries=cfg.nan_retries, resume_hint=hint)), clock.phase("training"):
        if n_exact:
            net, stats = _train_exact_heads(net, ld, cfg, swap, dcfg, mixed, n_exact, n_calib, report, calib_rows,
                                            given)
        else:
            net, stats = distill(net, mixed, dcfg, shard=shard)
    if not ld.main and not shard:  # the other processes helped train; the main one evaluates and saves
        return None
    # sharded, every process takes part in the evaluation's forward passes (the main one reports)
    if ld.heldout is not None:
        report["converted"] = perplexity(net, ld.heldout, label="converted perplexity")
    if ld.ood is not None:
        ppl = perplexity(net, ld.ood, label="converted perplexity (out of domain)")
        if ld.main:
            report["out_of_domain"]["converted"] = ppl
    with clock.phase("saving"):
        saved = save_run(cfg, ld, net, out, ckpts, shard)
    if not saved:
        return None
    report.update(out=str(out), trained_params={"transfer": stats.transfer_params, "lora": stats.lora_params},
                  tokens_seen=stats.tokens, train_seconds=stats.seconds, wall_seconds=clock.wall(), seconds=clock.report(),
                  startup_seconds=clock.startup,
                  final_losses=stats.losses, device=str(ld.device))
    return report


def _train_exact_heads(net, ld, cfg: LinearizeConfig, swap: dict, dcfg, train, n_exact, n_calib: int, report: dict,
                       calib_rows, given: tuple | None = None):
    """Attention transfer; per-KV-head calibration on retrieval-bearing text; the ``n_exact`` heads with the
    highest alpha stay exact (mixed layers), the others linear (``auto``: the fewest that meet the recall
    floor; ``given``: the heads named, calibration run and reported all the same); then LoRA against the
    teacher's logits."""
    import dataclasses

    from ..distill.calibrate import CalibrationConfig, calibrate
    from ..distill.checkpoint import current_run
    from ..distill.train import distill

    share, mix, probe = calib_rows  # calibration_mix
    scores = {}
    if ld.main or cfg.exact_heads_by == "probe":  # which heads retrieve, by the teacher's attention (the report,
        from ..evals.probe import retrieval_probe  # its plot; every process when it ranks the heads)

        scores = retrieval_probe(net, mix.ids, mix.details)
        report["retrieval_probe"] = scores
    net, stats = distill(net, train, dataclasses.replace(dcfg, lora_steps=0))
    answers = cfg.calib_loss == "answers"
    calib = calibrate(net, answer_rows(mix) if answers else mix.ids,
                      CalibrationConfig(steps=n_calib, batch_size=cfg.batch_size, per_head=True, seed=cfg.seed,
                                        step_offset=dcfg.transfer_steps, answers_only=answers))
    alphas = calib.units()  # (layer, KV head) -> alpha
    ranked = list(given) if given else rank_heads(alphas, scores, cfg.exact_heads_by)
    by = "given" if given else cfg.exact_heads_by
    if n_exact == AUTO:
        record = current_run().done_stages.setdefault("calibration", {})
        if "auto" not in record:  # a resumed run takes the N found before (the scan ran on the weights of then)
            record["auto"] = auto_exact_heads(net, mix.ids, mix.details, probe, ranked, cfg.recall_floor)
        report["exact_heads_auto"] = record["auto"]
        n_exact = record["auto"]["chosen"]
    per_layer = _set_exact(net, swap["layers"], ranked[:n_exact])
    swaps = exact_head_swaps(swap, per_layer)
    alpha_report = {str(i): [round(a, 6) for a in calib.alphas[i]] for i in sorted(calib.alphas)}
    exact_report = {str(i): h for i, h in per_layer.items() if h}
    net.config.attnswap = {**net.config.attnswap, "swaps": swaps,
                           "calibration": {"unit": "kv_head", "alpha": alpha_report, "exact_heads": exact_report,
                                           "steps": n_calib, "retrieval_mix": share, "ranked_by": by,
                                           "loss": cfg.calib_loss}}
    report.update(alpha=alpha_report, exact_heads=exact_report, exact_head_count=n_exact, exact_heads_by=by,
                  calib_loss=cfg.calib_loss,
                  calibration_retrieval_mix=share, calibration_seconds=calib.seconds, calibration_loss=calib.loss,
                  calibration_tokens=calib.tokens, kv_cache=kv_cache_bytes(net.config, swaps, ld.dtype))
    lora = dataclasses.replace(dcfg, transfer_steps=0, step_offset=dcfg.transfer_steps + n_calib)
    net, lstats = distill(net, train, lora)
    stats.lora_params = lstats.lora_params
    stats.tokens += calib.tokens + lstats.tokens
    stats.seconds += calib.seconds + lstats.seconds
    stats.losses.update({"calibration": calib.loss, **lstats.losses})
    return net, stats


def answer_rows(mix):
    """The calibration rows that carry retrieval, with the positions that predict their answers marked
    (``--calib-loss answers``: calibration's KL counts there only)."""
    import torch

    from ..distill.calibrate import mark_answers

    rows = [r for r in sorted(mix.details) if mix.details[r].facts]
    return mark_answers(mix.ids[torch.tensor(rows, dtype=torch.long)], [[f.answer for f in mix.details[r].facts] for r in rows])


def rank_heads(alphas: dict, probe: dict, by: str) -> list:
    """The (layer, KV head) units, the first to keep exact first: by calibrated alpha (highest first), or
    by the retrieval probe's score (the teacher's attention mass on the facts; highest first). Ties go
    to the lower unit."""
    if by == "alpha":
        return sorted(alphas, key=lambda u: (-alphas[u], u))
    heads = (probe or {}).get("head") or {}
    if not heads:  # calibration_mix refuses such a run before training; here for direct callers
        raise AttnSwapError("--exact-heads-by probe: the retrieval probe found no facts to score the heads by")

    def score(u):
        layer, h = u
        row = heads.get(layer, heads.get(str(layer), []))
        return row[h] if h < len(row) else 0.0

    return sorted(alphas, key=lambda u: (-score(u), u))


def calibration_mix(ld, cfg: LinearizeConfig, n_exact):
    """The calibration rows (a share carrying retrieval) and the probe's rows among them; ``auto`` with
    no row to probe is refused."""
    from ..synthetic import build_mix

    share = cfg.retrieval_mix if cfg.retrieval_mix > 0 else CALIB_RETRIEVAL
    mix = build_mix(ld.train, ld.tokenizer, fraction=share, seed=cfg.seed + 1)
    probe = [r for r in sorted(mix.details) if mix.details[r].facts][:PROBE_ROWS]
    if n_exact == AUTO and not probe:
        raise AttnSwapError(f"--exact-heads auto needs retrieval rows to probe, and none fits in --seq-len {cfg.seq_len}; "
                            "give a longer --seq-len or the number of exact heads")
    if n_exact and cfg.exact_heads_by == "probe" and not probe:
        raise AttnSwapError(f"--exact-heads-by probe needs retrieval rows to probe, and none fits in --seq-len "
                            f"{cfg.seq_len}; give a longer --seq-len or rank by alpha")
    if n_exact and cfg.calib_loss == "answers" and not probe:
        raise AttnSwapError(f"--calib-loss answers needs calibration rows carrying retrieval, and none fits in --seq-len "
                            f"{cfg.seq_len}; give a longer --seq-len or --calib-loss all")
    return share, mix, probe


def _set_exact(net, layers: list[int], units) -> dict[int, list[int]]:
    """Keep the (layer, KV head) ``units`` exact in ``net``'s converted layers; returns layer -> heads."""
    from ..convert import swapped_modules

    per_layer = {i: sorted(h for (layer, h) in units if layer == i) for i in layers}
    for m in swapped_modules(net):
        m.set_exact_heads(per_layer.get(m.layer_idx, []))
    return per_layer


def auto_exact_heads(net, ids, details, probe: list[int], ranked: list, floor: float) -> dict:
    """The smallest N such that, with the first N of ``ranked`` exact, the model recalls at least ``floor``
    of the teacher's recall on the probe rows (N = all heads always does: it is the teacher)."""
    from ..convert import attention_mode

    with attention_mode(net, "teacher"):
        teacher = answer_recall(net, ids, details, probe)
    curve = {}
    chosen = len(ranked)
    for n in range(len(ranked) + 1):
        _set_exact(net, sorted({layer for layer, _ in ranked}), ranked[:n])
        curve[str(n)] = answer_recall(net, ids, details, probe)
        if curve[str(n)] >= floor * teacher - 1e-12:
            chosen = n
            break
    return {"chosen": chosen, "recall_floor": floor, "teacher_recall": teacher, "recall": curve,
            "probe_rows": len(probe), "probe_tokens": sum(b - a for r in probe for a, b in (f.answer for f in details[r].facts))}


def answer_recall(net, ids, details, rows: list[int]) -> float:
    """Share of the answer tokens of ``rows`` (facts asked for later, ``synthetic.build_mix``) that the
    model predicts greedily, each from the exact row up to it (one forward pass per row)."""
    import torch

    dev = next(net.parameters()).device
    hits = total = 0
    with torch.no_grad():
        for r in rows:
            row = ids[r : r + 1].to(dev)
            pred = net(input_ids=row, use_cache=False).logits[0].argmax(-1)
            for f in details[r].facts:
                a, b = f.answer
                hits += int((pred[a - 1 : b - 1] == row[0, a:b]).sum())
                total += b - a
    return hits / max(1, total)


def exact_head_swaps(swap: dict, per_layer: dict[int, list[int]]) -> list[dict]:
    """The swap split by exact-head set: layers keeping the same KV heads exact share one swap (its
    options then say which); layers with none keep the options as given."""
    groups: dict[tuple, list[int]] = {}
    for i in swap["layers"]:
        groups.setdefault(tuple(per_layer.get(i, [])), []).append(i)
    out = []
    for heads, layers in sorted(groups.items(), key=lambda kv: kv[1][0]):
        options = {**swap["options"], "exact_heads": list(heads)} if heads else dict(swap["options"])
        out.append({**swap, "layers": layers, "options": options})
    return out


def kv_cache_bytes(config, swaps: list[dict], dtype, length: int = KV_REPORT_LENGTH) -> dict:
    """KV-cache bytes per token of the whole model: before (the teacher: every layer keeps every head's
    keys and values) and after (layers left softmax keep all heads, converted layers only their exact
    heads). Converted layers' fixed-size state (window and linear sums) is not per token and not counted."""
    import torch

    heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_head = 2 * dim * torch.empty((), dtype=dtype).element_size()  # a key and a value, one head, one token
    n = config.num_hidden_layers
    kept = [heads] * n
    for s in swaps:
        for i in s["layers"]:
            kept[i] = len(s["options"].get("exact_heads", []))
    before, after = n * heads * per_head, sum(kept) * per_head
    return {"per_token_before": before, "per_token_after": after, "ratio": after / before, "length": length,
            "before": before * length, "after": after * length}
