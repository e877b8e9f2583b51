"""Distillation: stage 1 attention transfer, stage 2 LoRA against the teacher's logits.

The loop knows nothing of the conversion method. It asks the model's replacement modules for their
stage-1 parameters (``transfer_parameters``) and switches them between ``transfer``, ``teacher`` and
``student`` modes (see ``convert/base.py``). The teacher is the same model run in ``teacher`` mode
with the LoRA adapters disabled, so no second copy of the weights is held.

Multi-GPU runs go through accelerate: ``accelerate launch -m attnswap.cli linearize ...``. Each
process takes its own slice of every global batch. ``distill(..., shard=True)`` under several
processes shards the model with FSDP2 first (``sharding.py``); the commands pass it when launched
with an FSDP accelerate config (``sharding.wanted``).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from ..convert.base import attention_mode, swapped_modules
from ..convert.swap import decoder_layers
from ..errors import AttnSwapError, env_switch
from ..hf_compat import pop_cache, unpadded_rows
from ..progress import console, progress_bar
from . import sharding
from .checkpoint import FULL_STAGE, current_run
from .logit_loss import LogitLoss, next_token_targets

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class DistillConfig:
    transfer_steps: int
    lora_steps: int
    batch_size: int = 8
    transfer_lr: float = 1e-2
    lr: float = 1e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    ce_weight: float = 0.0
    seed: int = 0
    warmup: int = 10
    lora_trains_features: bool = True  # also train the stage-1 parameters during stage 2
    full_train: tuple[str, ...] = ()  # stage 2 trains these modules (e.g. k_proj, v_proj) in full instead of LoRA
    transfer_blocks: tuple[str, ...] = ()  # no swapped modules: stage 1 trains these attention linears in full (block_transfer)
    step_offset: int = 0  # global steps run before stage 1 (by an earlier stage, e.g. calibration)


@dataclass
class DistillStats:
    transfer_params: int = 0
    lora_params: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: dict = field(default_factory=dict)
    step_seconds: dict = field(default_factory=dict)  # stage name -> each step's wall time (each ends in a sync)
    graph_steps: dict = field(default_factory=dict)  # stage name -> steps replayed as a CUDA graph (StepGraph)
    # stage name -> each step's host time from the NaN guard's answer (a sync) to the loss read: gradient
    # clipping, the optimizer, the schedule. On CUDA the device waits for these launches (profile_train.py)
    update_seconds: dict = field(default_factory=dict)


def split_steps(steps: int, transfer_steps: int | None, lora_steps: int | None) -> tuple[int, int]:
    """--steps is the total. By default 40% go to attention transfer, the rest to LoRA."""
    if transfer_steps is None and lora_steps is None:
        transfer_steps = max(1, round(steps * 0.4)) if steps > 1 else 1
        lora_steps = steps - transfer_steps
    elif transfer_steps is None:
        transfer_steps = max(0, steps - lora_steps)
    elif lora_steps is None:
        lora_steps = max(0, steps - transfer_steps)
    return transfer_steps, lora_steps


class Batches:
    """Deterministic shuffled batches: batch ``step`` depends only on (seed, step), so a run can
    resume at any step. Each accelerate process takes a strided slice of the global batch."""

    def __init__(self, seqs: torch.Tensor, batch_size: int, seed: int, accelerator: Accelerator):
        self.seqs, self.bs, self.seed, self.acc = seqs, batch_size, seed, accelerator

    @staticmethod
    def indices(n: int, batch_size: int, seed: int, world: int, step: int) -> torch.Tensor:
        """The rows of the global batch ``step`` (all processes'), out of ``n``."""
        global_bs = batch_size * world
        per_epoch = max(1, n // global_bs)
        epoch, k = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        return perm[(torch.arange(global_bs) + k * global_bs) % n]

    def __call__(self, step: int) -> torch.Tensor:
        world = self.acc.num_processes
        idx = self.indices(self.seqs.shape[0], self.bs, self.seed, world, step)
        return self.seqs[idx[self.acc.process_index :: world]].to(self.acc.device)


def _schedule(opt, warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _freeze_all(model):
    for p in model.parameters():
        p.requires_grad_(False)


def attention_transfer(model, batches: Batches, cfg: DistillConfig, acc: Accelerator, stats: DistillStats):
    """Stage 1: every converted layer sees the teacher's inputs (teacher forcing) and learns to match
    the softmax output (MSE), all layers in one pass. Only feature maps and mixing factors train."""
    if cfg.transfer_steps <= 0:
        return
    _freeze_all(model)
    params = [p for m in swapped_modules(model) for p in m.transfer_parameters()]
    sharded = any(sharding.is_sharded(p) for p in params)
    for p in params:
        if not sharded:  # FSDP gathers a layer in one buffer: sharded parameters keep the layer's dtype
            p.data = p.data.float()
        p.requires_grad_(True)
    stats.transfer_params = sum(p.numel() for p in params)
    opt = adamw(params, cfg.transfer_lr, sharded)
    sched = _schedule(opt, cfg.warmup, cfg.transfer_steps)
    # the decoder stack: stage 1 needs no logits; sharded, the whole model runs (FSDP's root unit holds
    # the embeddings, tied or not, and is gathered by the model's own forward)
    body = model if sharded else getattr(model, "model", model)
    loss_fn = (lambda ids: _sharded_transfer_loss(model, ids)) if sharded else (lambda ids: _transfer_loss(model, body, ids))
    _loop("attention transfer", cfg.transfer_steps, batches, acc, stats, opt, sched, params, loss_fn,
          step_offset=cfg.step_offset, module=model)


def block_transfer(model, teacher, batches: Batches, cfg: DistillConfig, acc: Accelerator, stats: DistillStats):
    """Stage 1 for conversions that rewrite the attention weights themselves (GQA merges), which have no
    swapped modules: every layer's attention block of ``model`` is fed the input the teacher's block of
    the same layer sees (teacher forcing) and learns to reproduce that block's output. The loss is
    each layer's squared error over the teacher output's mean square, averaged over layers, so that
    every layer counts alike. Only the linear layers named in ``cfg.transfer_blocks`` (attention
    projections) train, in full (float32 while training: ``_full_train``). The loss is local: no
    logits, and no layer learns to undo another's error."""
    if cfg.transfer_steps <= 0:
        return
    if swapped_modules(model):
        raise ValueError("block_transfer is for models without swapped modules; attention_transfer trains those")
    if teacher is None:
        raise ValueError("block_transfer needs a separate teacher model")
    if any(sharding.is_sharded(p) for p in model.parameters()):
        raise AttnSwapError("attention-block transfer is not supported when sharding")
    _freeze_all(model)
    params, undo = _full_train(model, cfg.transfer_blocks)
    stats.transfer_params = sum(p.numel() for p in params)
    opt = adamw(params, cfg.transfer_lr)
    sched = _schedule(opt, cfg.warmup, cfg.transfer_steps)
    loss_fn = block_transfer_loss(model, teacher)
    try:
        _loop("attention-block transfer", cfg.transfer_steps, batches, acc, stats, opt, sched, params, loss_fn,
              step_offset=cfg.step_offset, module=model)
    finally:
        undo()
        _freeze_all(model)
    current_run().carry(params)  # LoRA leaves them frozen: its checkpoints must still hold them


def block_transfer_loss(model, teacher):
    """``loss_fn(ids)`` of ``block_transfer``: one teacher forward (decoder stack only) whose attention
    blocks' inputs are recorded by hooks, then every attention block of ``model`` run on the recorded
    input of its layer (the same positional arguments and keywords: position embeddings, mask)."""
    student_blocks = [layer.self_attn for layer in decoder_layers(model)]
    teacher_blocks = [layer.self_attn for layer in decoder_layers(teacher)]
    if len(student_blocks) != len(teacher_blocks):
        raise ValueError("the model and its teacher have different numbers of layers")
    seen: list = [None] * len(teacher_blocks)

    def capture(i):
        def fn(_mod, args, kwargs, out):
            kwargs = dict(kwargs)
            if pop_cache(kwargs) is not None:
                raise AttnSwapError("the teacher ran with a KV cache during attention-block transfer")
            seen[i] = (args, kwargs, out[0] if isinstance(out, tuple) else out)
        return fn

    def loss_fn(ids):
        seen[:] = [None] * len(seen)
        hooks = [b.register_forward_hook(capture(i), with_kwargs=True) for i, b in enumerate(teacher_blocks)]
        try:
            with torch.no_grad():
                getattr(teacher, "model", teacher)(input_ids=ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        if any(x is None for x in seen):
            raise AttnSwapError("the teacher's forward skipped an attention block: attention-block transfer needs them all")
        total = 0.0
        for i, block in enumerate(student_blocks):
            args, kwargs, target = seen[i]
            out = block(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            target = target.float()
            total = total + (out.float() - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
            seen[i] = None
        return total / len(student_blocks)

    return loss_fn


def _transfer_loss(model, body, ids):
    with attention_mode(model, "transfer") as mods:
        body(input_ids=ids, use_cache=False)
        losses = [m.transfer_loss for m in mods]
    return torch.stack(losses).mean()


def _sharded_transfer_loss(model, ids):
    """Stage 1 under FSDP. Each layer's loss is computed inside that layer (local to it and to this
    process's batch), but FSDP gathers a layer's weights for the backward pass only when a gradient
    reaches the layer's output; so each layer's output carries ``0 * its loss`` and the returned loss
    carries ``0 * the logits``: the backward pass then walks the layers in order, each one gathered
    before its loss's gradient needs its weights (o_proj, for one). The added zeros change no value."""
    hooks = []
    for layer in sharding.decoder_layers(model):
        mods = swapped_modules(layer)
        if mods:
            hooks.append(layer.register_forward_hook(lambda _l, _a, out, mods=mods: _carry(out, mods), prepend=True))
    try:
        with attention_mode(model, "transfer") as mods:
            logits = model(input_ids=ids, use_cache=False).logits
            losses = [m.transfer_loss for m in mods]
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(losses).mean() + 0.0 * logits.float().sum()


def _carry(out, mods):
    extra = sum(m.transfer_loss for m in mods if m.transfer_loss is not None) * 0.0
    if isinstance(out, torch.Tensor):
        return out + extra.to(out.dtype)
    return (out[0] + extra.to(out[0].dtype), *out[1:])


def lora_finetune(model, batches: Batches, cfg: DistillConfig, acc: Accelerator, stats: DistillStats, teacher=None):
    """Stage 2: LoRA on q/k/v/o of the converted layers (all layers if none is converted), loss =
    KL(teacher || student) on the logits (+ ce_weight * next-token cross-entropy). The teacher is
    ``teacher`` when given (a separate frozen model), else the model itself in teacher mode with the
    adapters off. ``cfg.full_train`` trains those modules in full instead (needs ``teacher``).
    Returns the model with LoRA merged into its weights."""
    if cfg.lora_steps <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    _freeze_all(model)
    if cfg.full_train:
        if teacher is None:
            raise ValueError("full_train needs a separate teacher model")
        peft_model, (params, undo) = model, _full_train(model, cfg.full_train)
    else:
        converted = sorted({m.layer_idx for m in swapped_modules(model)})
        which = "|".join(map(str, converted)) if converted else r"\d+"
        pattern = rf".*layers\.({which})\.self_attn\.({'|'.join(LORA_TARGETS)})"
        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=pattern)
        with warnings.catch_warnings():  # peft asks transformers >= 5.25 a deprecated property; no checkpointing here
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, lcfg)
        if cfg.lora_trains_features:
            for m in swapped_modules(model):
                for p in m.transfer_parameters():
                    p.requires_grad_(True)
        params = [p for p in peft_model.parameters() if p.requires_grad]
    stats.lora_params = sum(p.numel() for p in params)
    sharded = any(sharding.is_sharded(p) for p in model.parameters())
    opt = adamw(params, cfg.lr, sharded)
    sched = _schedule(opt, cfg.warmup, cfg.lora_steps)

    kl = LogitLoss(peft_model, teacher)  # a block of rows at a time where the split holds (logit_loss.py)

    def loss_fn(ids):
        if teacher is not None:
            with torch.no_grad():
                t_out = kl.teacher(ids)
        else:
            with torch.no_grad(), peft_model.disable_adapter(), attention_mode(model, "teacher"):
                t_out = kl.teacher(ids)
        targets = next_token_targets(ids) if cfg.ce_weight else None
        return kl(kl.student(ids), t_out, targets=targets, ce_weight=cfg.ce_weight)

    _loop(FULL_STAGE if cfg.full_train else "LoRA distillation", cfg.lora_steps, batches, acc, stats, opt, sched, params, loss_fn,
          step_offset=cfg.step_offset + cfg.transfer_steps, module=peft_model)
    if cfg.full_train:
        undo()
        return model
    if sharded:  # merging would add whole LoRA products to weight shards; sharding.merged_state_dict does it
        return peft_model
    return peft_model.merge_and_unload()


def _full_train(model, names: tuple[str, ...]):
    """Make the weights (and biases) of modules named ``names`` trainable, kept in float32 while
    training (inputs cast up, outputs cast back). Returns (params, undo)."""
    mods = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names]
    dtype = next(model.parameters()).dtype
    hooks = []
    for m in mods:
        m.float()
        hooks.append(m.register_forward_pre_hook(lambda _m, args: tuple(a.float() for a in args)))
        hooks.append(m.register_forward_hook(lambda _m, args, out: out.to(dtype)))
    params = [p for m in mods for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)

    def undo():
        for h in hooks:
            h.remove()
        for m in mods:
            m.to(dtype)

    return params, undo


FUSED_ENV = "ATTNSWAP_FUSED_ADAMW"  # unset / "1": AdamW as one fused kernel on CUDA (unsharded); "0": torch's default


def adamw(params, lr: float, sharded: bool = False) -> torch.optim.AdamW:
    """The stages' optimiser. On CUDA, unsharded, torch's fused AdamW by default (``ATTNSWAP_FUSED_ADAMW=0``
    gives torch's default): a launch or two a step instead of several per tensor group, which shortens the host
    time a step spends after the graph's replay (``DistillStats.update_seconds``; H200, lolcats at 2 x 4,096:
    4.5 -> 1.6 ms transfer, 6.1 -> 3.5 ms LoRA). CPU parameters and sharded ones (FSDP's DTensors, the
    per-tensor form) keep torch's default."""
    params = list(params)
    fused = (env_switch(FUSED_ENV, True, "torch's default AdamW", "fused AdamW") and not sharded and bool(params)
             and all(p.device.type == "cuda" and p.is_floating_point() for p in params))
    if fused:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False if sharded else None)


GRAPH_ENV = "ATTNSWAP_TRAIN_GRAPH"  # "0": every training step eager; unset or "1": one CUDA graph a stage where possible


class StepGraph:
    """A training step's forward and backward (``loss_fn(ids)`` then ``backward``) captured once as a CUDA
    graph and replayed for every later batch of the same shape: the host issues one launch where an
    eager LoRA step issues ~9,000 (a small model's training is bound by the host: docs/BENCHMARKS.md).
    The optimizer, the NaN guard and checkpoints stay eager; the parameters are updated in place, so
    the replay reads their new values. The gradients live in the graph's memory: after each replay the
    parameters' ``.grad`` point at them again, and the eager path (``run`` returns None) is the
    reference the CUDA test compares against. Capturing needs a forward without host syncs."""

    def __init__(self, loss_fn, params, warmup: int = 2):
        self.loss_fn, self.params, self.warmup = loss_fn, list(params), warmup
        self.graph = None
        self.failed: str | None = None

    @staticmethod
    def wanted(acc: Accelerator, params) -> bool:
        """Not turned off (``ATTNSWAP_TRAIN_GRAPH=0``) and possible: CUDA, one process, unsharded, no loss
        scaler. On by default since the H200 measurement (docs/BENCHMARKS.md): the same losses and the
        same converted model as the eager steps, in half the time of a LoRA step."""
        return (env_switch(GRAPH_ENV, True, "eager training steps", "CUDA graphs") and acc.device.type == "cuda"
                and acc.num_processes == 1
                and getattr(acc, "scaler", None) is None and not any(sharding.is_sharded(p) for p in params))

    def run(self, ids: torch.Tensor):
        """The step's loss, its gradients in ``.grad``; None where the eager step must run instead (another
        batch shape than the captured one, or a capture that failed)."""
        if self.failed is not None:
            return None
        if self.graph is None:
            try:
                self._capture(ids)
            except Exception as e:  # a host sync or an unsupported operator inside the step
                self.failed = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                for p in self.params:
                    p.grad = None
                torch.cuda.synchronize()
                torch.cuda.empty_cache()  # what the failed capture's pool held goes back to the eager steps
                console.print(f"[yellow]warning:[/yellow] the training step could not be captured as a CUDA graph "
                              f"({self.failed}); it runs eagerly", highlight=False, soft_wrap=True)
                return None
        if ids.shape != self.ids.shape or ids.dtype != self.ids.dtype:
            return None
        self.ids.copy_(ids)
        self.graph.replay()
        for p, g in zip(self.params, self.grads):
            p.grad = g
        return self.loss

    def _capture(self, ids: torch.Tensor) -> None:
        with unpadded_rows():  # training rows hold no padding: no mask is read on the host
            self._capture_unpadded(ids)

    def _capture_unpadded(self, ids: torch.Tensor) -> None:
        self.ids = ids.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: autotuning, lazy initialisation, allocator
            for _ in range(self.warmup):
                for p in self.params:
                    p.grad = None
                self.loss_fn(self.ids).backward()
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.loss = self.loss_fn(self.ids)
            self.loss.backward()
        self.graph, self.grads = graph, [p.grad for p in self.params]


def _loop(name, steps, batches, acc, stats, opt, sched, params, loss_fn, step_offset=0, module=None) -> dict:
    """One stage's optimisation. The current TrainingRun (checkpoint.py) resumes it, checkpoints it,
    handles Ctrl-C, and skips steps with NaN/inf (see faults.py); ``module`` names the parameters.
    Returns the stage's record in the run, which later checkpoints keep (a stage may add results)."""
    run = current_run()
    run.main_process = acc.is_main_process
    run.accelerator = acc
    sharded = any(sharding.is_sharded(p) for p in params)
    t0, seen = time.perf_counter(), 0
    times = stats.step_seconds.setdefault(name, [])
    updates = stats.update_seconds.setdefault(name, [])
    graph = StepGraph(loss_fn, params) if StepGraph.wanted(acc, params) else None
    st = run.stage(name, step_offset, steps, module or torch.nn.ParameterList(params), opt, sched, params)
    with st, progress_bar("loss", "tok/s") as bar:
        task = bar.add_task(name, total=steps, completed=st.start, loss="-", **{"tok/s": "-"})
        for step in range(st.start, steps):
            t_step = time.perf_counter()
            ids = batches(step_offset + step)
            loss = graph.run(ids) if graph is not None else None
            if loss is None:
                loss = loss_fn(ids)
                acc.backward(loss)
            else:
                stats.graph_steps[name] = stats.graph_steps.get(name, 0) + 1
            if acc.num_processes > 1:  # every process takes its slice of the global batch: average
                loss = _all_reduce_grads(acc, params, loss)
            finite = st.finite(step, loss, lambda: loss_fn(ids))
            t_update = time.perf_counter()
            if finite:
                if sharded:
                    sharding.clip_grad_norm_(params, 1.0, acc)
                else:
                    acc.clip_grad_norm_(params, 1.0)
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            updates.append(time.perf_counter() - t_update)
            seen += ids.numel() * acc.num_processes
            st.tokens += ids.numel() * acc.num_processes
            st.add_loss(loss.item())  # waits for the step's work: the step times below are device-inclusive
            times.append(time.perf_counter() - t_step)
            rate = seen / max(1e-9, time.perf_counter() - t0)
            bar.update(task, advance=1, loss="-" if st.ema is None else f"{st.ema:.4g}", **{"tok/s": f"{rate:,.0f}"})
            st.step_done(step + 1)
    stats.tokens += st.tokens
    stats.seconds += time.perf_counter() - t0
    stats.losses[name] = st.ema
    return run.done_stages.get(name, {})


def _all_reduce_grads(acc: Accelerator, params, loss):
    """Average the trainable parameters' gradients (and the loss) over processes, in one flat buffer,
    so every process takes the same step. Trainable sets are small (feature maps, LoRA), so this
    costs little and needs no DDP wrapper (whose hooks would not follow the stages' changing
    trainable sets). Sharded parameters' gradients FSDP has already averaged (reduce-scatter)."""
    params = [p for p in params if not sharding.is_sharded(p)]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.detach().float().reshape(1)])
    flat = acc.reduce(flat, reduction="mean")
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i : i + n].view_as(g).to(g.dtype)
        i += n
    return flat[-1]


def distill(model, train_seqs: torch.Tensor, cfg: DistillConfig, accelerator: Accelerator | None = None, teacher=None,
            shard: bool = False):
    """Run both stages on ``model`` (already converted). Returns (model, stats). ``teacher``: a separate
    frozen model whose logits stage 2 matches (for conversions that change the weights, e.g. GQA).
    ``shard`` (several processes): shard ``model`` (and ``teacher``) with FSDP2 first; the result is
    then the sharded model with its LoRA adapters unmerged (``sharding.merged_state_dict``)."""
    acc = accelerator or Accelerator(cpu=next(model.parameters()).device.type == "cpu")
    if sharding.wanted(acc) and not shard:
        raise AttnSwapError("launched with FSDP (an accelerate config with distributed_type FSDP) but asked to "
                            "run unsharded: pass shard=True to distill; see docs/MULTIGPU.md")
    if shard and acc.num_processes > 1:
        if cfg.full_train:
            raise AttnSwapError("full_train is not supported when sharding")
        sharding.shard(model, acc)
        if teacher is not None:
            sharding.shard(teacher, acc)
    torch.manual_seed(cfg.seed)
    batches = Batches(train_seqs, cfg.batch_size, cfg.seed, acc)
    stats = DistillStats()
    model.train()
    if cfg.transfer_blocks:
        block_transfer(model, teacher, batches, cfg, acc, stats)
    else:
        attention_transfer(model, batches, cfg, acc, stats)
    model = lora_finetune(model, batches, cfg, acc, stats, teacher=teacher)
    model.eval()
    _freeze_all(model)
    return model, stats
