"""Data-parallel training: 2 processes on CPU over gloo match one process with the same global batch."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import lm_labels, tiny_model, token_batch
from launching import free_port, launch
from peft import get_peft_model

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config

WORKER = Path(__file__).parent / "distributed" / "ddp_worker.py"


def run(command: Callable[[], list[str]]) -> None:
    result = launch(command, timeout=150)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", ["prefix", "ipt"])
def test_two_processes_match_one_process_and_ranks_agree(method, wrap, tmp_path):
    """DDP, and FSDP2 full sharding (every parameter split over the ranks, the adapter's included) on CPU/gloo."""
    run(lambda: [sys.executable, str(WORKER), str(tmp_path / "single.json"), method])
    run(
        lambda: [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(WORKER),
            str(tmp_path / "ddp.json"),
            method,
            wrap,
        ]
    )
    single = json.loads((tmp_path / "single.json").read_text())
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    # Tolerance: the two runs sum the same numbers in another order (per-rank means, then an all-reduce).
    torch.testing.assert_close(
        torch.tensor(ddp["losses"]), torch.tensor(single["losses"]), rtol=1e-4, atol=1e-5
    )
    sharded, trainable = ddp["sharded"]
    assert sharded == (trainable if wrap == "fsdp" else 0)
    rank0, rank1 = ddp["weights"]
    assert rank0 == rank1  # every rank holds bit-identical adapter weights, the instance encoder included
    # Adam divides by the root of the second moment, so tiny gradient differences in near-zero coordinates
    # show up in the weights: allow 1e-4, 1% of one step at lr 1e-2.
    for name, values in single["weights"][0].items():
        torch.testing.assert_close(torch.tensor(rank0[name]), torch.tensor(values), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_gradient_accumulation_equals_the_larger_batch(config_cls):
    ids = token_batch(4, 8)
    grads = []
    for chunks in (1, 2):
        torch.manual_seed(0)
        model = get_peft_model(tiny_model("llama"), config_cls(task_type="CAUSAL_LM", init_weights=False))
        model.train()
        for part in ids.chunk(chunks):
            (model(input_ids=part, labels=lm_labels(part)).loss / chunks).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_bf16_autocast_training_tracks_float32(config_cls):
    ids = token_batch(4, 8)
    curves = []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = get_peft_model(tiny_model("llama"), config_cls(task_type="CAUSAL_LM", init_weights=False))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(8):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                loss = model(input_ids=ids, labels=lm_labels(ids)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        curves.append(torch.tensor(losses))
    # bf16 keeps 8 bits of mantissa: the curves agree to about 2% and both fall
    torch.testing.assert_close(curves[1], curves[0], rtol=0.02, atol=0.02)
    assert curves[1][-1] < curves[1][0]


@pytest.mark.slow
def test_torch_compile_matches_eager_forward_and_trains():
    model = get_peft_model(
        tiny_model("llama"), PrefixTuningV2Config(task_type="CAUSAL_LM", init_weights=False)
    )
    ids = token_batch()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager, rtol=1e-5, atol=1e-5)
    model.train()
    compiled(input_ids=ids, labels=lm_labels(ids)).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["prefix_v2", "ipt"])
def test_fullgraph_compile_is_refused_naming_the_reason_and_the_ways_that_work(method):
    """The prompts are computed in Python hooks at the model's entry, which torch.compile runs between graphs."""
    config = (
        PrefixTuningV2Config(task_type="CAUSAL_LM", init_weights=False)
        if method == "prefix_v2"
        else InstancePromptConfig(task_type="CAUSAL_LM", init_weights=False)
    )
    model = get_peft_model(tiny_model("llama"), config).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad(), pytest.raises(Exception, match="(?s)Python hooks.*compile without fullgraph=True"):
        compiled(input_ids=token_batch())
    torch._dynamo.reset()
    # torch.export's strict mode traces as fullgraph does; its default (strict=False) works (test_peft_gaps.py)
    with torch.no_grad(), pytest.raises(Exception, match=r"(?s)Python hooks.*strict=False\) \(its default\)"):
        torch.export.export(model, (), {"input_ids": token_batch()}, strict=True)
    torch._dynamo.reset()


# -- torch.nn.DataParallel ---------------------------------------------------------------------------------------
# Trainer wraps the model in DataParallel when one process sees several GPUs. Its replicas share the original
# modules' hooks and run in threads, so they would share the tuner's per-call prompts: refused, naming DDP.


def data_parallel_replica(model: torch.nn.Module) -> torch.nn.Module:
    """What torch.nn.parallel.replicate builds for one device, without the copy to it (it needs CUDA)."""
    modules = list(model.modules())
    replicas = {id(m): m._replicate_for_data_parallel() for m in modules}
    for module in modules:
        replica = replicas[id(module)]
        for name, child in module._modules.items():
            replica._modules[name] = None if child is None else replicas[id(child)]
        for name, parameter in module._parameters.items():
            setattr(replica, name, parameter)  # None too (a Linear without bias), as replicate() does
    return replicas[id(model)]


@pytest.mark.parametrize("method", ["prefix", "ipt", "lora"])
def test_data_parallel_replicas_are_refused_naming_ddp(method):
    from peft import LoraConfig

    configs = {
        "prefix": lambda: PrefixTuningV2Config(task_type="CAUSAL_LM", prefix_length=3),
        "ipt": lambda: InstancePromptConfig(task_type="CAUSAL_LM", prompt_length=3),
        "lora": lambda: LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]),
    }
    model = get_peft_model(tiny_model("llama"), configs[method]())
    ids = token_batch(2, 6)
    replica = data_parallel_replica(model)
    if method == "lora":  # the harness is sound: LoRA's replica runs and gives the model's logits
        with torch.no_grad():
            torch.testing.assert_close(replica(input_ids=ids).logits, model(input_ids=ids).logits)
        return
    with pytest.raises(
        RuntimeError, match=r"cannot run under torch.nn.DataParallel.*accelerate launch or torchrun"
    ):
        replica(input_ids=ids)
    with torch.no_grad():
        model(input_ids=ids)  # the model itself still runs
