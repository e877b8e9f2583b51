"""A program for tests/test_multiprocess.py, run under a launcher of several processes: distil a tiny
linearized Llama with or without FSDP2 sharding and write the trained, merged weights (main process).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT.safetensors [--shard]
"""

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # tests/ holds names (kernels/) that must not shadow installed packages

import torch  # noqa: E402


def main(out: str, shard: bool) -> None:
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from attnswap.convert.swap import make_swap
    from attnswap.distill import sharding
    from attnswap.distill.train import DistillConfig, distill
    from attnswap.modeling import convert_model

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=2, num_hidden_layers=3, max_position_embeddings=512, vocab_size=300)
    model = AutoModelForCausalLM.from_config(cfg)
    convert_model(model, [make_swap("lolcats", [0, 1, 2], {"window": 8}, model.config)], source="tiny")
    seqs = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(1))
    dcfg = DistillConfig(transfer_steps=3, lora_steps=3, batch_size=1, warmup=2, seed=3)
    model, stats = distill(model, seqs, dcfg, accelerator=acc, shard=shard)
    if shard:
        assert any(sharding.is_sharded(p) for p in model.parameters())
        state = sharding.merged_state_dict(model)
    else:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in state.items()}, out)
        print("losses", stats.losses, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], "--shard" in sys.argv[2:])
    from attnswap.cli import _close_process_group, leave

    _close_process_group(done=True)  # the way the command line ends a multi-process run (cli.main)
    leave(0)
