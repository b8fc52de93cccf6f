"""Speed benchmark: peft-ipt's prefix methods against the bare model and peft's own methods, in one process.

Usage (from the repository root, with the package installed)::

    python benchmarks/speed.py --quick                 # tiny random Llama, few repeats: a CI smoke run
    python benchmarks/speed.py --model tiny            # tiny random Llama with grouped-query attention
    python benchmarks/speed.py --model smollm2         # bundled SmolLM2-135M-Instruct (tens of minutes on 2 cores)
    python benchmarks/speed.py --model minilm          # bundled all-MiniLM-L6-v2 as a SEQ_CLS encoder
    python benchmarks/speed.py --model smollm2 --parts inference --methods bare,v2,v2_folded,ipt,peft_prefix,lora
                                                       # generation only, fewer methods: speed_smollm2_inference.*
    python benchmarks/speed.py --model smollm2 --scaling   # cost as the prefix length and the sequence grow
    python benchmarks/speed.py --model smollm2 --device cuda --dtype bf16

Methods, all at the same prefix / prompt length P (``--prefix-length``, default 16):

- ``bare``: the model without an adapter. Its training step is full fine-tuning (every parameter, AdamW), the
  cost an adapter saves; its generation and inference rows are the floor every adapter is compared with.
- ``v2``: peft-ipt ``PrefixTuningV2Config(prefix_length=P)`` (default: the MLP reparameterisation);
  ``v2_flat``: the same with ``reparameterize=False``, which is peft PrefixTuning's default parameterisation;
  ``v2_folded`` (inference rows only): ``v2`` after ``model.fold()``, the MLP folded into flat keys/values.
- ``ipt``: peft-ipt ``InstancePromptConfig(prompt_length=P)``, otherwise defaults (hybrid injection);
  ``ipt_frozen``: the same with ``instance_source="frozen_model"``, whose instance signal costs one extra forward of
  the frozen model without gradient (once per training step, once per ``generate`` call); ``ipt_frozen_half``: that
  pass stopped at the middle layer (``frozen_layers`` = half the layers), half its cost.
- ``peft_prefix``: peft ``PrefixTuningConfig(num_virtual_tokens=P)`` (flat, peft's default);
  ``peft_prefix_mlp``: the same with ``prefix_projection=True, encoder_hidden_size=512``, like for like with
  ``v2``'s MLP; ``peft_prompt``: peft
  ``PromptTuningConfig(num_virtual_tokens=P)``; ``lora``: peft ``LoraConfig(r=8)`` (default target modules).

Measurements:

1. training step: ``zero_grad`` + forward + backward + ``AdamW.step`` on one fixed batch (causal LMs: 8 x 64
   tokens, the first 32 a prompt without loss, which IPT's instance signal reads, the LM loss on the other 32;
   MiniLM: 32 x 64, SEQ_CLS with 2 labels).
2. greedy generation: tokens/s = batch x new tokens / wall time of one ``generate`` call (prefill included).
   Prompts are 32 random tokens, all the same length (no padding); ``min_new_tokens = max_new_tokens = 64`` so
   EOS never ends a row early. Batch 1 and batch 8.
3. encoder inference (MiniLM): examples/s of a ``no_grad`` forward of the training batch.
4. peak memory of one training step, measured after the timed steps (so AdamW's state exists):
   - CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
     ``memory_allocated()`` before the step.
   - CPU has no such counter. The step runs once under ``torch.profiler.profile(profile_memory=True)``: with
     memory profiling on, torch's CPU allocator reports every block it allocates (+bytes) and every free of a
     block it allocated while profiling (-bytes). The running sum of these events in time order is the bytes
     the step allocated and still holds; its maximum is the step's peak above what was live before it
     (activations, gradients, optimizer temporaries). Frees of blocks allocated before profiling are not
     reported (torch warns "Memory block of unknown size"), which can only overstate the peak, never hide
     allocations; ``zero_grad(set_to_none=True)`` runs before profiling, so every method starts without
     gradients. Scratch memory that oneDNN/MKL take outside torch's allocator is not seen (a few MB at most).
   The tables give that "step peak" and, for context, "total" = step peak + parameters, buffers and optimizer
   state. On a frozen 135M model the total is dominated by the shared weights, so the step peak is the stricter
   comparison; both are reported.

Timing: each measurement is repeated round-robin over the methods (every round visits every method once, the
order rotating by one each round), so background load on a shared machine hits all methods alike, after
``--warmup`` untimed rounds. Tables give medians; a ratio is a ratio of medians, and ``[p25-p75]`` is the spread
of the per-round paired ratios (a method's time over the reference's time in the same round): the noise. Absolute
numbers on a shared CPU are noisy; read the ratios.

Results go to ``benchmarks/results/speed_<model>.{json,md,png}`` (``speed_<model>_scaling.*`` for
``--scaling``, ``speed_quick.*`` for ``--quick``), and the markdown is printed.

An earlier ``--profile`` mode timed peft-ipt's attention wrapper under torch.profiler and prototyped a prefix held in
the KV cache; its finding is in the README (Speed and memory) and the prototype is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402
from tqdm import tqdm  # noqa: E402

import peft_ipt  # noqa: E402
from peft_ipt import InstancePromptConfig, PrefixTuningV2Config  # noqa: E402

transformers.logging.set_verbosity_error()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, figure, quartiles, save_figure, write_outputs  # noqa: E402

LABELS = {
    "bare": "bare model",
    "v2": "peft-ipt PrefixTuningV2 (MLP)",
    "v2_flat": "peft-ipt PrefixTuningV2 (flat)",
    "v2_folded": "peft-ipt PrefixTuningV2 (folded)",
    "ipt": "peft-ipt InstancePrompt",
    "ipt_frozen": "peft-ipt InstancePrompt (frozen-model source)",
    "ipt_frozen_half": "peft-ipt InstancePrompt (frozen-model source, half depth)",
    "peft_prefix": "peft PrefixTuning",
    "peft_prefix_mlp": "peft PrefixTuning (MLP)",
    "peft_prompt": "peft PromptTuning",
    "lora": "peft LoRA r=8",
}
INFERENCE_ONLY = ("v2_folded",)
SCALING_METHODS = ("bare", "v2", "peft_prefix")
REFERENCES = ("bare", "peft_prefix")

# The targets this benchmark reports on: (measurement, methods, reference, bound, "<=" or ">=").
TARGETS = [
    ("train_step", ("v2",), "peft_prefix", 1.0, "<="),
    ("train_step", ("ipt",), "peft_prefix", 1.1, "<="),
    ("train_step", ("ipt_frozen", "ipt_frozen_half"), "peft_prefix", 1.35, "<="),
    ("gen_b1", ("v2", "v2_folded"), "peft_prefix", 0.95, ">="),
    ("gen_b8", ("v2", "v2_folded"), "peft_prefix", 0.95, ">="),
    ("gen_b1", ("v2", "v2_folded"), "bare", 0.9, ">="),
    ("gen_b8", ("v2", "v2_folded"), "bare", 0.9, ">="),
    ("peak_step", ("v2", "ipt"), "peft_prefix", 1.05, "<="),
    ("peak_total", ("v2", "ipt"), "peft_prefix", 1.05, "<="),
]


# ---------------------------------------------------------------------------------------------------
# Models


@dataclass
class ModelSpec:
    name: str
    task: str  # peft task type
    load: Callable[[], torch.nn.Module]
    vocab: int
    train_batch: int
    description: str
    scaling_batch: int = 8


def _tiny_llama() -> torch.nn.Module:
    # Grouped-query attention as in SmolLM2 (4 query heads share 2 key/value heads); so small that the Python
    # cost of each layer call shows clearly.
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _smollm2() -> torch.nn.Module:
    from peft_ipt.assets import bundled_model_path

    return transformers.AutoModelForCausalLM.from_pretrained(
        bundled_model_path("smollm2"), attn_implementation="sdpa", dtype=torch.float32
    )


def _minilm() -> torch.nn.Module:
    from peft_ipt.assets import bundled_model_path

    torch.manual_seed(0)  # the classifier head is new: one seed gives every method the same head
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        bundled_model_path("minilm"), num_labels=2, attn_implementation="sdpa", dtype=torch.float32
    )


MODELS = {
    "tiny": ModelSpec(
        "tiny", "CAUSAL_LM", _tiny_llama, 256, 8, "random Llama: 4 layers, d=64, 4 q / 2 kv heads"
    ),
    "smollm2": ModelSpec(
        "smollm2",
        "CAUSAL_LM",
        _smollm2,
        49152,
        8,
        "SmolLM2-135M-Instruct: 30 layers, d=576, 9 q / 3 kv heads",
        2,
    ),
    "minilm": ModelSpec("minilm", "SEQ_CLS", _minilm, 30522, 32, "all-MiniLM-L6-v2 (BERT): 6 layers, d=384"),
}


# ---------------------------------------------------------------------------------------------------
# Methods


def make_config(method: str, task: str, P: int):
    if method in ("v2", "v2_folded"):
        return PrefixTuningV2Config(task_type=task, prefix_length=P)
    if method == "v2_flat":
        return PrefixTuningV2Config(task_type=task, prefix_length=P, reparameterize=False)
    if method == "ipt":
        return InstancePromptConfig(task_type=task, prompt_length=P)
    if method in ("ipt_frozen", "ipt_frozen_half"):  # half: frozen_layers set from the model in build_runner
        return InstancePromptConfig(task_type=task, prompt_length=P, instance_source="frozen_model")
    if method == "peft_prefix":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=P)
    if method == "peft_prefix_mlp":  # like for like with v2's default: the same MLP width
        return PrefixTuningConfig(
            task_type=task, num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=512
        )
    if method == "peft_prompt":
        return PromptTuningConfig(task_type=task, num_virtual_tokens=P)
    if method == "lora":
        return LoraConfig(task_type=task, r=8)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(LABELS)}")


@dataclass
class Runner:
    """One method on its own copy of the model, with its optimizer, or the error that stopped its setup."""

    method: str
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    trainable: int = 0
    error: str | None = None


def _error(error: BaseException) -> str:
    first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}"


def build_runner(method: str, spec: ModelSpec, P: int, device: torch.device, trained: bool) -> Runner:
    runner = Runner(method)
    try:
        model = spec.load()
        if method != "bare":
            torch.manual_seed(1234)  # v2 and v2_folded start from the same adapter weights
            config = make_config(method, spec.task, P)
            if method == "ipt_frozen_half":
                config.frozen_layers = model.config.num_hidden_layers // 2
            model = get_peft_model(model, config)
            if method == "v2_folded":
                model.base_model.fold()
        model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        runner.trainable = sum(p.numel() for p in params)
        if trained:
            runner.optimizer = torch.optim.AdamW(params, lr=1e-5)
        runner.model = model
    except Exception as error:  # noqa: BLE001 - a method that fails is a result, not the end of the run
        runner.error = _error(error)
        traceback.print_exc(file=sys.stderr)
    return runner


def configured_length(runner: Runner) -> int | None:
    """P as the built adapter's own config states it: the check that every method runs at the same length."""
    if runner.model is None or runner.method in ("bare", "lora"):
        return None
    config = runner.model.peft_config["default"]
    for name in ("prefix_length", "prompt_length", "num_virtual_tokens"):
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    return None


# ---------------------------------------------------------------------------------------------------
# One call of each kind


@dataclass
class Setting:
    device: torch.device
    dtype: str  # "fp32", or "bf16" under autocast

    def autocast(self):
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def make_batch(spec: ModelSpec, batch: int, seq: int, device: torch.device, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, spec.vocab, (batch, seq), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if spec.task == "CAUSAL_LM":
        # instruction-style rows: the first half is the prompt (no loss; the source IPT reads), the rest the target
        inputs["labels"] = ids.clone()
        inputs["labels"][:, : seq // 2] = -100
    else:
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=generator)
    return {k: v.to(device) for k, v in inputs.items()}


def train_step(runner: Runner, batch: dict, setting: Setting) -> None:
    runner.optimizer.zero_grad(set_to_none=True)
    with setting.autocast():
        loss = runner.model(**batch).loss
    loss.backward()
    runner.optimizer.step()


def generate(runner: Runner, batch: dict, new_tokens: int, setting: Setting) -> torch.Tensor:
    with torch.no_grad(), setting.autocast():
        return runner.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=runner.model.config.eos_token_id,
        )


def infer(runner: Runner, batch: dict, setting: Setting) -> None:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), setting.autocast():
        runner.model(**inputs)


def round_robin(
    runners: list[Runner],
    call: Callable[[Runner], object],
    setting: Setting,
    warmup: int,
    repeats: int,
    desc: str,
) -> dict[str, dict[str, list[float]] | str]:
    """Per method, ``repeats`` timings of ``call`` as {"wall": [s, ...], "cpu": [s, ...]}, or the error string of
    its first failing call. "cpu" is this process's CPU time (``time.process_time``): on a shared machine it leaves
    out the time the process waited for a core, which wall time includes."""
    live = [r for r in runners if r.error is None]
    times: dict[str, dict | str] = {r.method: r.error for r in runners if r.error is not None}
    times.update({r.method: {"wall": [], "cpu": []} for r in live})
    with tqdm(total=(warmup + repeats) * len(live), desc=desc, file=sys.stderr, leave=False) as bar:
        for round_index in range(warmup + repeats):
            shift = round_index % max(len(live), 1)
            for runner in live[shift:] + live[:shift]:
                bar.update()
                if isinstance(times[runner.method], str):
                    continue
                gc.collect()
                try:
                    setting.sync()
                    wall, cpu = time.perf_counter(), time.process_time()
                    call(runner)
                    setting.sync()
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                except Exception as error:  # noqa: BLE001 - record it and go on with the other methods
                    times[runner.method] = _error(error)
                    traceback.print_exc(file=sys.stderr)
                    continue
                if round_index >= warmup:
                    times[runner.method]["wall"].append(wall)
                    times[runner.method]["cpu"].append(cpu)
    return times


# ---------------------------------------------------------------------------------------------------
# Peak memory (see the module docstring for the method)


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def resident_bytes(runner: Runner) -> int:
    """Parameters, buffers and optimizer state: what is live when a step starts (gradients are None then)."""
    state = [v for s in runner.optimizer.state.values() for v in s.values()]
    return _storage_bytes(itertools.chain(runner.model.parameters(), runner.model.buffers(), state))


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes that ``fn`` allocated through torch's CPU allocator and still held, at any moment."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate(e.nbytes() for e in events), default=0)


def step_peak_bytes(runner: Runner, batch: dict, setting: Setting) -> int:
    runner.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if setting.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(runner, batch, setting)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return cpu_peak_bytes(lambda: train_step(runner, batch, setting))


def measure_peaks(runners: list[Runner], batch: dict, setting: Setting) -> dict[str, dict | str]:
    out: dict[str, dict | str] = {}
    for runner in tqdm(runners, desc="peak memory", file=sys.stderr, leave=False):
        if runner.error is not None:
            out[runner.method] = runner.error
            continue
        try:
            peak = step_peak_bytes(runner, batch, setting)
        except Exception as error:  # noqa: BLE001
            out[runner.method] = _error(error)
            traceback.print_exc(file=sys.stderr)
            continue
        resident = resident_bytes(runner)
        out[runner.method] = {"step": peak, "resident": resident, "total": peak + resident}
    return out


# ---------------------------------------------------------------------------------------------------
# Summaries


def summarise(raw: dict[str, dict | str], work: float, higher_is_better: bool) -> dict[str, dict | str]:
    """Median value (``work / seconds`` for throughputs, seconds otherwise) and ratios to each reference.

    For each clock (wall, and CPU time with the prefix ``cpu_``): ``vs_<ref>`` is the ratio of the medians and
    ``vs_<ref>_iqr`` the quartiles of the per-round paired ratios. A ratio > 1 means more of the measured
    quantity: faster for throughputs, slower for times.
    """
    out: dict[str, dict | str] = {}
    for method, times in raw.items():
        if isinstance(times, str):
            out[method] = times
            continue
        seconds = statistics.median(times["wall"])
        entry = {
            "median_s": seconds,
            "median_cpu_s": statistics.median(times["cpu"]),
            "value": work / seconds if higher_is_better else seconds,
            "n": len(times["wall"]),
        }
        for ref in REFERENCES:
            ref_times = raw.get(ref)
            if not isinstance(ref_times, dict) or not ref_times["wall"]:
                continue
            for clock, prefix in (("wall", ""), ("cpu", "cpu_")):
                mine, theirs = times[clock], ref_times[clock]
                ratio = statistics.median(mine) / statistics.median(theirs)
                entry[f"{prefix}vs_{ref}"] = 1 / ratio if higher_is_better else ratio
                paired = [t / r for t, r in zip(mine, theirs, strict=False) if r and t]
                paired = [1 / x for x in paired] if higher_is_better else paired
                entry[f"{prefix}vs_{ref}_iqr"] = quartiles(paired)
        out[method] = entry
    return out


def summarise_memory(peaks: dict[str, dict | str], key: str) -> dict[str, dict | str]:
    out: dict[str, dict | str] = {}
    for method, peak in peaks.items():
        if isinstance(peak, str):
            out[method] = peak
            continue
        entry = {"value": peak[key] / 2**20}
        for ref in REFERENCES:
            if isinstance(peaks.get(ref), dict) and peaks[ref][key]:
                entry[f"vs_{ref}"] = peak[key] / peaks[ref][key]
        out[method] = entry
    return out


def check_targets(summaries: dict[str, dict], judge: str) -> list[dict]:
    """Each target against the measured ratio; ``judge`` ("cpu" or "wall") is the clock the verdict uses."""
    rows = []
    for measurement, methods, ref, bound, sense in TARGETS:
        for method in methods:
            entry = summaries.get(measurement, {}).get(method)
            if entry is None:
                continue
            row = {
                "measurement": measurement,
                "method": method,
                "reference": ref,
                "target": f"{sense} {bound}",
            }
            if isinstance(entry, str) or f"vs_{ref}" not in entry:
                row.update(status="no data", note=entry if isinstance(entry, str) else f"{ref} failed")
                rows.append(row)
                continue
            timed = f"cpu_vs_{ref}" in entry
            key = f"cpu_vs_{ref}" if judge == "cpu" and timed else f"vs_{ref}"
            ratio, iqr = entry[key], entry.get(f"{key}_iqr")
            met = ratio <= bound if sense == "<=" else ratio >= bound
            note = ""
            if iqr is not None and min(iqr) <= bound <= max(iqr):
                note = "within noise: the paired-ratio IQR contains the bound"
            row.update(
                wall=entry[f"vs_{ref}"],
                wall_iqr=entry.get(f"vs_{ref}_iqr"),
                cpu=entry.get(f"cpu_vs_{ref}"),
                cpu_iqr=entry.get(f"cpu_vs_{ref}_iqr"),
                judged_on=("CPU time" if key.startswith("cpu_") else "wall time") if timed else "bytes",
                status="met" if met else "MISSED",
                note=note,
            )
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# Rendering


def _ratio_cell(entry, key: str) -> str:
    if not isinstance(entry, dict) or key not in entry:
        return "—"
    cell = f"{entry[key]:.2f}"
    iqr = entry.get(f"{key}_iqr")
    if iqr is not None:
        cell += f" [{iqr[0]:.2f}–{iqr[1]:.2f}]"
    return cell


def _value_cell(entry, fmt: str) -> str:
    if entry is None:
        return "—"
    if isinstance(entry, str):
        return f"error: `{entry}`"
    return fmt.format(entry["value"])


MEASUREMENTS = {
    # key: (column title, unit, format, higher is better)
    "train_step": ("training step", "ms", "{:.1f}", False),
    "peak_step": ("step peak memory", "MiB", "{:.1f}", False),
    "peak_total": ("total memory", "MiB", "{:.0f}", False),
    "gen_b1": ("generate, batch 1", "tokens/s", "{:.1f}", True),
    "gen_b8": ("generate, batch 8", "tokens/s", "{:.1f}", True),
    "infer": ("inference", "examples/s", "{:.1f}", True),
}


def measurement_table(
    summaries: dict[str, dict], key: str, methods: list[str], labels: dict[str, str] = LABELS
) -> str:
    title, unit, fmt, _ = MEASUREMENTS[key]
    entries = summaries.get(key, {})
    timed = any(isinstance(e, dict) and "cpu_vs_bare" in e for e in entries.values())
    header = ["method", f"{title} ({unit})", "× bare", "× peft PrefixTuning"]
    ratio_keys = ["vs_bare", "vs_peft_prefix"]
    if timed:
        header += ["CPU time: × bare", "CPU time: × peft PrefixTuning"]
        ratio_keys += ["cpu_vs_bare", "cpu_vs_peft_prefix"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        if method not in entries:
            continue
        entry = entries[method]
        row = [
            labels.get(method, method),
            _value_cell(entry, fmt),
            *(_ratio_cell(entry, k) for k in ratio_keys),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def targets_table(rows: list[dict]) -> str:
    lines = [
        "| target | wall-time ratio | CPU-time ratio | judged on | status | note |",
        "|---|---|---|---|---|---|",
    ]

    def cell(ratio, iqr):
        if ratio is None:
            return "—"
        return f"{ratio:.3f}" + (f" [{iqr[0]:.2f}–{iqr[1]:.2f}]" if iqr is not None else "")

    for row in rows:
        title = MEASUREMENTS[row["measurement"]][0]
        target = f"{LABELS[row['method']]}: {title} {row['target']} × {LABELS[row['reference']]}"
        lines.append(
            f"| {target} | {cell(row.get('wall'), row.get('wall_iqr'))} | {cell(row.get('cpu'), row.get('cpu_iqr'))} "
            f"| {row.get('judged_on', '—')} | {row['status']} | {row['note']} |"
        )
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {torch.get_num_threads()} torch threads"


def library_state() -> str:
    """The commit, and a digest of peft-ipt's source files (the tree may hold uncommitted changes)."""
    import hashlib
    import subprocess

    root = Path(peft_ipt.__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"commit {commit}, src/peft_ipt digest {digest.hexdigest()[:10]}"


def environment(args, setting: Setting) -> dict:
    return {
        "device": device_name(setting.device),
        "dtype": setting.dtype + (" (autocast)" if setting.dtype != "fp32" else ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_ipt": peft_ipt.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "library_state": args.library_state,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def plot_ratios(
    summaries: dict[str, dict], keys: list[str], methods: list[str], title: str, path: Path
) -> None:
    fig, axes = figure(1, len(keys), (4.2, 4.6))
    for ax, key in zip(axes[0], keys, strict=True):
        name, unit, _, higher = MEASUREMENTS[key]
        shown = [m for m in methods if isinstance(summaries.get(key, {}).get(m), dict)]
        x = range(len(shown))
        for offset, ref, color in ((-0.2, "bare", "#8da0cb"), (0.2, "peft_prefix", "#fc8d62")):
            values = [summaries[key][m].get(f"vs_{ref}", float("nan")) for m in shown]
            ax.bar([i + offset for i in x], values, width=0.4, color=color, label=f"× {LABELS[ref]}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        for measurement, _, ref, bound, _ in TARGETS:
            if measurement == key:
                ax.axhline(
                    bound, color="#8da0cb" if ref == "bare" else "#fc8d62", linestyle="--", linewidth=0.8
                )
        ax.set_xticks(list(x))
        ax.set_xticklabels(
            [LABELS[m].replace("peft-ipt ", "").replace("peft ", "peft\n") for m in shown],
            rotation=60,
            ha="right",
            fontsize=7,
        )
        ax.set_title(f"{name}\n({'higher' if higher else 'lower'} is better)", fontsize=9)
    axes[0][0].set_ylabel("ratio (dashed: targets)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------
# The main comparison


def output_checks(runners: dict[str, Runner], spec: ModelSpec, device: torch.device) -> dict[str, dict]:
    """Comparability: P read back from every config; every prompt method visibly changes the output of the
    untrained model (LoRA starts as the identity by design); folding keeps the outputs."""
    batch = make_batch(spec, 2, 16, device, seed=7)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = {}
    for method, runner in runners.items():
        if runner.error is None:
            runner.model.eval()
            with torch.no_grad():
                logits[method] = runner.model(**inputs).logits.float()
    checks = {}
    for method, runner in runners.items():
        check = {"P": configured_length(runner), "trainable_params": runner.trainable}
        if method in logits and "bare" in logits and method != "bare":
            length = logits["bare"].shape[1]  # peft PromptTuning returns P more positions, in front
            change = logits[method][:, -length:] - logits["bare"]
            check["max_abs_logit_change_vs_bare"] = change.abs().max().item()
        checks[method] = check
    if "v2" in logits and "v2_folded" in logits:
        checks["v2_folded"]["max_abs_logit_diff_vs_unfolded"] = (
            (logits["v2"] - logits["v2_folded"]).abs().max().item()
        )
    return checks


def measure_training(
    args, trained: list[Runner], train_batch: dict, setting: Setting, raw: dict, summaries: dict
) -> None:
    """The timed training steps and the step's peak memory, into ``raw`` and ``summaries``."""
    for runner in trained:
        if runner.model is not None:
            runner.model.train()
    print(
        f"[speed] training step: {len(trained)} methods x {args.warmup}+{args.repeats} rounds",
        file=sys.stderr,
    )
    raw["train_step"] = round_robin(
        trained,
        lambda r, b=train_batch: train_step(r, b, setting),
        setting,
        args.warmup,
        args.repeats,
        "train step",
    )
    summaries["train_step"] = summarise(raw["train_step"], 1000.0, False)
    for entry in summaries["train_step"].values():
        if isinstance(entry, dict):
            entry["value"] *= 1000.0  # seconds -> ms
    print("[speed] peak memory", file=sys.stderr)
    peaks = measure_peaks(trained, train_batch, setting)
    raw["peak_memory_bytes"] = peaks
    summaries["peak_step"] = summarise_memory(peaks, "step")
    summaries["peak_total"] = summarise_memory(peaks, "total")


def comparison_stem(args, spec: ModelSpec) -> str:
    """speed_<model>, or speed_<model>_<part> when --parts measured one part only."""
    stem = "speed_quick" if args.quick else f"speed_{spec.name}"
    return stem if set(args.parts) == set(PARTS) else f"{stem}_{'_'.join(args.parts)}"


def run_comparison(args, spec: ModelSpec, setting: Setting) -> tuple[dict, str]:
    P, device = args.prefix_length, setting.device
    methods = [m for m in LABELS if m in args.methods]
    causal = spec.task == "CAUSAL_LM"
    runners: dict[str, Runner] = {}
    for method in tqdm(methods, desc="setup", file=sys.stderr, leave=False):
        runners[method] = build_runner(method, spec, P, device, trained=method not in INFERENCE_ONLY)
    checks = output_checks(runners, spec, device)
    trained = [runners[m] for m in methods if m not in INFERENCE_ONLY]
    raw: dict[str, dict] = {}
    summaries: dict[str, dict] = {}

    train_batch = make_batch(spec, args.train_batch or spec.train_batch, args.train_seq, device)
    if "train" in args.parts:
        measure_training(args, trained, train_batch, setting, raw, summaries)

    measured = "inference" in args.parts
    inference = [runners[m] for m in methods] if measured else []
    infer_keys = (["gen_b1", "gen_b8"] if causal else ["infer"]) if measured else []
    for runner in inference:
        if runner.model is not None:
            runner.model.eval()
    gen_shapes: dict[str, dict] = {}
    if causal and inference:
        for batch_size in (1, 8):
            key = f"gen_b{batch_size}"
            batch = make_batch(spec, batch_size, args.prompt_length, device, seed=batch_size)

            def call(runner, batch=batch, batch_size=batch_size):
                out = generate(runner, batch, args.new_tokens, setting)
                gen_shapes.setdefault(runner.method, {})[batch_size] = list(out.shape)

            print(
                f"[speed] generate batch {batch_size}: {args.gen_warmup}+{args.gen_repeats} rounds",
                file=sys.stderr,
            )
            raw[key] = round_robin(inference, call, setting, args.gen_warmup, args.gen_repeats, key)
            summaries[key] = summarise(raw[key], batch_size * args.new_tokens, True)
    elif inference:
        raw["infer"] = round_robin(
            inference,
            lambda r: infer(r, train_batch, setting),
            setting,
            args.warmup,
            args.repeats,
            "inference",
        )
        summaries["infer"] = summarise(raw["infer"], train_batch["input_ids"].shape[0], True)
    for method, shapes in gen_shapes.items():
        checks[method]["generate_output_shapes"] = shapes

    judge = "cpu" if setting.device.type == "cpu" else "wall"
    targets = check_targets(summaries, judge)
    env = environment(args, setting)
    settings = {
        "model": spec.name,
        "model_description": spec.description,
        "task": spec.task,
        "prefix_length": P,
        "parts": list(args.parts),
        "train_batch": list(train_batch["input_ids"].shape),
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "gen_warmup": args.gen_warmup,
        "gen_repeats": args.gen_repeats,
    }
    data = {
        "environment": env,
        "settings": settings,
        "checks": checks,
        "raw": raw,
        "summary": summaries,
        "targets": targets,
        "targets_judged_on": judge,
    }

    train_methods = [m for m in methods if m not in INFERENCE_ONLY]
    md = [
        f"## Speed: {spec.name} ({spec.description}), P = {P}",
        "",
        f"{env['device']}; {env['dtype']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}; peft-ipt {env['library_state']}; {env['date']}; `{env['command']}`.",
        "",
        (
            f"Training step: batch {settings['train_batch'][0]} x {settings['train_batch'][1]}, zero_grad + "
            f"forward + backward + AdamW, median of {args.repeats} after {args.warmup} warm-up rounds. "
            "`bare model` trains every parameter (full fine-tuning)."
            if "train" in args.parts
            else f"Training not measured (`--parts {' '.join(args.parts)}`)."
        ),
        "Ratios: medians over medians; [p25–p75]: quartiles of the per-round paired ratios. Times: lower is "
        "better; throughputs: higher is better. Values and the first ratios are wall time; the `CPU time` ratios "
        "use this process's CPU time, which leaves out waiting for a core on a shared machine"
        + (" (the targets are judged on them)." if judge == "cpu" else "."),
        "",
    ]
    if "train" in args.parts:
        md += [
            measurement_table(summaries, "train_step", train_methods),
            "",
            measurement_table(summaries, "peak_step", train_methods),
            "",
            measurement_table(summaries, "peak_total", train_methods),
            "",
        ]
    if causal and infer_keys:
        md += [
            f"Greedy generation: {args.prompt_length}-token prompts, {args.new_tokens} new tokens "
            f"(min_new_tokens = max_new_tokens), median of {args.gen_repeats} after {args.gen_warmup} warm-up rounds"
            + (
                " (fewer repeats than the training rows: set by --gen-repeats)"
                if args.gen_repeats < args.repeats
                else ""
            )
            + ".",
            "",
        ]
    elif infer_keys:
        md += [
            f"Inference: no_grad forward of the {settings['train_batch'][0]} x {settings['train_batch'][1]} batch.",
            "",
        ]
    for key in infer_keys:
        md += [measurement_table(summaries, key, methods), ""]
    md += [
        "### Targets",
        "",
        targets_table(targets),
        "",
    ]
    md += [
        "### Comparability checks",
        "",
        "| method | P | trainable params | max abs logit change vs bare (untrained) |",
        "|---|---|---|---|",
    ]
    for method in methods:
        c = checks[method]
        change = c.get("max_abs_logit_change_vs_bare")
        md.append(
            f"| {LABELS[method]} | {c['P'] if c['P'] is not None else '—'} | {c['trainable_params']:,} | "
            f"{'—' if change is None else f'{change:.3g}'} |"
        )
    if "max_abs_logit_diff_vs_unfolded" in checks.get("v2_folded", {}):
        md += [
            "",
            f"fold() changes the logits by at most {checks['v2_folded']['max_abs_logit_diff_vs_unfolded']:.2e}.",
        ]
    errors = {m: r.error for m, r in runners.items() if r.error}
    if errors:
        md += ["", "Setup errors: " + "; ".join(f"{LABELS[m]}: `{e}`" for m, e in errors.items())]
    stem = comparison_stem(args, spec)
    plot_ratios(
        summaries,
        [*(["train_step", "peak_step"] if "train" in args.parts else []), *infer_keys],
        methods,
        f"{spec.name}, P={P}: ratios to the bare model and to peft PrefixTuning",
        args.out_dir / f"{stem}.png",
    )
    return data, "\n".join(md)


# ---------------------------------------------------------------------------------------------------
# Scaling


def run_scaling(args, spec: ModelSpec, setting: Setting) -> tuple[dict, str]:
    if spec.task != "CAUSAL_LM":
        raise SystemExit("--scaling compares generation too: use --model tiny or --model smollm2")
    batch_size = args.scaling_batch or spec.scaling_batch
    grid = [("prefix length", p, p, args.train_seq, args.prompt_length) for p in args.scaling_prefix]
    grid += [("sequence", s, args.prefix_length, s, s) for s in args.scaling_seq]
    points = []
    for axis, value, P, seq, prompt in grid:
        print(f"[speed] scaling: {axis} = {value} (P={P}, train seq {seq}, prompt {prompt})", file=sys.stderr)
        runners = [build_runner(m, spec, P, setting.device, trained=True) for m in SCALING_METHODS]
        train_batch = make_batch(spec, batch_size, seq, setting.device)
        for r in runners:
            if r.model is not None:
                r.model.train()
        raw_train = round_robin(
            runners,
            lambda r, b=train_batch: train_step(r, b, setting),
            setting,
            args.warmup,
            args.repeats,
            f"{axis}={value} train",
        )
        for r in runners:
            if r.model is not None:
                r.model.eval()
        gen_batch = make_batch(spec, 1, prompt, setting.device, seed=1)
        raw_gen = round_robin(
            runners,
            lambda r, b=gen_batch: generate(r, b, args.new_tokens, setting),
            setting,
            args.gen_warmup,
            args.gen_repeats,
            f"{axis}={value} generate",
        )
        points.append(
            {
                "axis": axis,
                "value": value,
                "P": P,
                "train_shape": [batch_size, seq],
                "prompt_length": prompt,
                "raw_train": raw_train,
                "raw_gen": raw_gen,
                "train": summarise(raw_train, 1.0, False),
                "gen": summarise(raw_gen, args.new_tokens, True),
            }
        )
        del runners
        gc.collect()

    env = environment(args, setting)
    md = [
        f"## Scaling: {spec.name} ({spec.description})",
        "",
        f"{env['device']}; {env['dtype']}; peft-ipt {env['library_state']}; `{env['command']}`.",
        f"Training step at batch {batch_size}; greedy generation at batch 1 with {args.new_tokens} new tokens. "
        f"Medians of {args.repeats} (training) / {args.gen_repeats} (generation) round-robin repeats. "
        "Sequence rows use P = {0} and a prompt as long as the training sequence.".format(args.prefix_length),
        "",
        "| axis | value | train: bare ms | PrefixTuningV2 ms | peft PrefixTuning ms | V2 × peft (wall / CPU) "
        "| V2 × bare (wall / CPU) | gen: bare tok/s | V2 tok/s | peft tok/s | V2 × peft (wall / CPU) "
        "| V2 × bare (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def val(summary, method, scale=1.0, fmt="{:.1f}"):
        entry = summary.get(method)
        if isinstance(entry, str):
            return f"error: `{entry}`"
        return fmt.format(entry["value"] * scale) if entry else "—"

    def ratio(summary, method, ref):  # "wall / CPU time"
        entry = summary.get(method)
        if not isinstance(entry, dict) or f"vs_{ref}" not in entry:
            return "—"
        return f"{entry[f'vs_{ref}']:.2f} / {entry[f'cpu_vs_{ref}']:.2f}"

    for p in points:
        t, g = p["train"], p["gen"]
        md.append(
            f"| {p['axis']} | {p['value']} | {val(t, 'bare', 1000)} | {val(t, 'v2', 1000)} | "
            f"{val(t, 'peft_prefix', 1000)} | {ratio(t, 'v2', 'peft_prefix')} | {ratio(t, 'v2', 'bare')} | "
            f"{val(g, 'bare')} | {val(g, 'v2')} | {val(g, 'peft_prefix')} | {ratio(g, 'v2', 'peft_prefix')} | "
            f"{ratio(g, 'v2', 'bare')} |"
        )
    data = {
        "environment": env,
        "settings": {
            "model": spec.name,
            "batch": batch_size,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "gen_repeats": args.gen_repeats,
        },
        "points": points,
    }
    _plot_scaling(points, spec.name, args.out_dir / f"speed_{spec.name}_scaling.png")
    return data, "\n".join(md)


def _plot_scaling(points: list[dict], model: str, path: Path) -> None:
    axes_names = list(dict.fromkeys(p["axis"] for p in points))
    fig, axes = figure(1, len(axes_names), (5, 4))
    for ax, axis in zip(axes[0], axes_names, strict=True):
        sub = [p for p in points if p["axis"] == axis]
        xs = [p["value"] for p in sub]
        for part, style in (("train", "-o"), ("gen", "--s")):
            for ref in REFERENCES:
                ys = [
                    p[part].get("v2", {}).get(f"vs_{ref}", float("nan"))
                    if isinstance(p[part].get("v2"), dict)
                    else float("nan")
                    for p in sub
                ]
                what = "step time" if part == "train" else "tokens/s"
                ax.plot(xs, ys, style, label=f"V2 {what} × {LABELS[ref]}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(axis)
        ax.set_ylabel("ratio")
        ax.legend(fontsize=7)
    fig.suptitle(f"{model}: PrefixTuningV2 relative cost as {' and '.join(axes_names)} grow", fontsize=10)
    save_figure(fig, path)


PARTS = ("train", "inference")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 warm-up + 3 repeats: a smoke run")
    parser.add_argument(
        "--scaling", action="store_true", help="prefix-length and sequence-length scaling table"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine, a second OpenMP thread waiting for a core held by "
        "another process made small ops 5x slower and the timings erratic); 0 keeps torch's default",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="what to measure: training steps and memory, generation (causal LMs) or inference (encoders); one "
        "part alone writes speed_<model>_<part>.*",
    )
    parser.add_argument("--prefix-length", "-P", type=int, default=16)
    parser.add_argument(
        "--methods", default=",".join(LABELS), help="comma-separated subset of: " + ", ".join(LABELS)
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (training / inference)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--gen-repeats", type=int, default=None, help="timed rounds for generation (default: --repeats)"
    )
    parser.add_argument("--gen-warmup", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=None, help="default: 8 (causal LMs), 32 (minilm)")
    parser.add_argument("--train-seq", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--scaling-prefix", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 128]
    )
    parser.add_argument("--scaling-seq", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512])
    parser.add_argument("--scaling-batch", type=int, default=None, help="default: 8 (tiny), 2 (smollm2)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.repeats, args.warmup, args.gen_warmup, args.new_tokens = "tiny", 3, 1, 1, 16
        args.gen_repeats = args.gen_repeats or 3
    args.gen_repeats = args.gen_repeats or args.repeats
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in LABELS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(LABELS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.library_state = library_state()  # before the run: others may edit the tree meanwhile
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    setting = Setting(device, args.dtype)
    spec = MODELS[args.model]
    start = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.scaling:
        data, markdown = run_scaling(args, spec, setting)
        stem = f"speed_{spec.name}_scaling"
    else:
        data, markdown = run_comparison(args, spec, setting)
        stem = comparison_stem(args, spec)
    data["environment"]["wall_seconds"] = round(time.perf_counter() - start, 1)
    markdown += f"\n\nWall time of this run: {data['environment']['wall_seconds']:.0f} s."
    write_outputs(stem, data, markdown, args.out_dir)


if __name__ == "__main__":
    main()
