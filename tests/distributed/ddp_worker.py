"""Trains a tiny model with an adapter for a few steps; under torchrun it runs DistributedDataParallel on gloo.

Usage: python ddp_worker.py OUT.json METHOD [WRAP]    (single process, global batch)
       torchrun --nproc_per_node 2 ddp_worker.py OUT.json METHOD [WRAP]    (each rank takes its half of every batch)

WRAP is ``ddp`` (DistributedDataParallel, the default) or ``fsdp`` (FSDP2's ``fully_shard`` on every decoder layer
and on the whole model: each rank holds a shard of every parameter, the adapter's included, and gathers them in the
forward of the module that owns them).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import lm_labels, tiny_model  # noqa: E402
from peft import get_peft_model  # noqa: E402

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config  # noqa: E402

STEPS, GLOBAL_BATCH, LENGTH = 5, 4, 9


def shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def full_weights(model: torch.nn.Module) -> dict[str, list[float]]:
    """Every trainable parameter in full (FSDP's are DTensor shards: gathered from all ranks)."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            value = param.full_tensor() if hasattr(param, "full_tensor") else param
            out[name] = value.detach().flatten().tolist()
    return out


def main(out_path: str, method: str, wrap: str = "ddp") -> None:
    distributed = "RANK" in os.environ
    rank, world = 0, 1
    if distributed:
        # A rank that waits on a lost peer raises after 60 s instead of hanging until the test's timeout.
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        rank, world = dist.get_rank(), dist.get_world_size()
    say = lambda message: print(f"[rank {rank}] {message}", file=sys.stderr, flush=True)  # noqa: E731
    say("process group ready")
    torch.manual_seed(0)
    config = (
        PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=4, init_weights=False)
        if method == "prefix"
        else InstancePromptConfig(
            task_type="CAUSAL_LM", prompt_length=4, instance_encoder="cnn", init_weights=False
        )
    )
    model = get_peft_model(tiny_model("llama"), config)
    model.train()
    trained = model
    if distributed and wrap == "fsdp":
        shard(model)  # in place: model is now sharded, and the optimizer below sees the shards
    elif distributed:
        trained = torch.nn.parallel.DistributedDataParallel(model)  # find_unused_parameters stays False
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.randint(3, 128, (STEPS, GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    share = GLOBAL_BATCH // world
    losses = []
    for step in range(STEPS):
        batch = data[step, rank * share : (rank + 1) * share]
        loss = trained(input_ids=batch, labels=lm_labels(batch)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reported = loss.detach().clone()
        if distributed:
            dist.all_reduce(reported)
            reported /= world
        losses.append(reported.item())
        say(f"step {step} loss {losses[-1]:.4f}")
    weights = full_weights(model)
    gathered = [None] * world
    if distributed:
        dist.all_gather_object(gathered, weights)
    else:
        gathered = [weights]
    trainable = [p for p in model.parameters() if p.requires_grad]
    sharded = sum(hasattr(p, "full_tensor") for p in trainable)  # DTensor shards under FSDP
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"losses": losses, "weights": gathered, "sharded": [sharded, len(trainable)]}, f)
    if distributed:
        dist.barrier()  # rank 0 has written its file before any rank tears the group down
        dist.destroy_process_group()
    say("done")


if __name__ == "__main__":
    main(*sys.argv[1:])
