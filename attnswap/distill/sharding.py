"""Sharded distillation (FSDP2's ``fully_shard``): each decoder layer's weights, and the rest of the
model's, are split across the processes and gathered one layer at a time during the forward and
backward passes, so a model that does not fit on one device can be distilled.

Sharding is asked for the way accelerate asks for FSDP: an accelerate config with
``distributed_type: FSDP`` (``examples/accelerate/fsdp.yaml``), which ``accelerate launch`` passes on
as ``ACCELERATE_USE_FSDP=true``. attnswap applies ``fully_shard`` itself (decoder layers, then the
root), the same on GPUs and on CPU with gloo (accelerate only turns its FSDP plugin on for GPUs).

What stays local: attention transfer computes each layer's loss inside that layer's forward, on the
process's own batch, while FSDP holds the layer's gathered weights; no attention map crosses
processes. Gradients of sharded parameters are reduce-scattered by FSDP; those of parameters added
after sharding (the LoRA adapters, small) are averaged by the loop like in the unsharded case.
"""

from __future__ import annotations

import os

import torch


def wanted(acc) -> bool:
    """Shard when launched with an FSDP accelerate config (several processes only). ``acc``: an
    ``Accelerator`` or accelerate's ``PartialState``. The one test of whether a launch asks for FSDP:
    the commands (pipelines/common.py, ``sharded_launch``) and ``distill`` both ask it."""
    if acc.num_processes < 2:
        return False
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def decoder_layers(model) -> list[torch.nn.Module]:
    body = getattr(model, "model", model)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")
    return list(layers)


def shard(model, acc) -> None:
    """FULL_SHARD with transformer-layer wrapping: every decoder layer is one FSDP unit, the root
    (embeddings, final norm, head) another. Parameters keep their dtype; a layer's trainable and frozen
    parameters must share one dtype (FSDP gathers a unit in one buffer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every process (a collective for sharded tensors: every process calls it)."""
    return t.full_tensor() if is_sharded(t) else t


def scatter(whole: torch.Tensor, like) -> torch.Tensor:
    """This process's shard of ``whole`` (the same on every process), laid out as the sharded tensor
    ``like`` (a DTensor); a collective: every process calls it."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements)


def clip_grad_norm_(params, max_norm: float, acc) -> torch.Tensor:
    """Clip the global gradient norm over sharded and replicated parameters alike: sharded gradients
    contribute their shards' squares summed over processes, replicated ones (already averaged, the
    same everywhere) count once."""
    sharded = [local(p.grad).float() for p in params if p.grad is not None and is_sharded(p.grad)]
    plain = [p.grad.float() for p in params if p.grad is not None and not is_sharded(p.grad)]
    sq_sharded = sum((g.pow(2).sum() for g in sharded), torch.zeros((), device=acc.device))
    sq_sharded = acc.reduce(sq_sharded.reshape(1), reduction="sum")[0]
    sq_plain = sum((g.pow(2).sum() for g in plain), torch.zeros((), device=acc.device))
    norm = (sq_sharded + sq_plain).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            local(p.grad).mul_(scale.to(p.grad.dtype))
    return norm


def merged_state_dict(model, main_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole trained model's state on the CPU of every process (``main_only``: of the main process
    only; the others get an empty dict), with the LoRA adapters merged into their weights (what
    ``merge_and_unload`` gives unsharded), under the plain model's names. Every process must call it
    (it gathers the shards, one tensor at a time, so no process holds more than one whole tensor on
    the device at once)."""
    keep = not main_only or _rank() == 0
    lora = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer") and "default" in getattr(mod, "lora_A", {}):
            lora[name] = mod
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if ".lora_" in name:
            continue
        whole = full(t)
        if keep:
            out[_plain(name)] = whole.detach().to("cpu").clone()
        del whole
    for name, mod in lora.items():
        a = full(mod.lora_A["default"].weight).detach().to("cpu").float()
        b = full(mod.lora_B["default"].weight).detach().to("cpu").float()
        if not keep:
            continue
        key = _plain(name) + ".weight"
        w = out[key]
        out[key] = (w.float() + (b @ a) * mod.scaling["default"]).to(w.dtype)
    return out


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _plain(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace(".base_layer", "")
