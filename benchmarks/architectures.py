"""Every model type transformers maps to a causal LM, a seq2seq LM, (encoders) a sequence classifier or (mapped to
none of those) an image-text-to-text model, on a tiny random model built from a generic config: does each method work
there, or refuse with a clear error, and what does peft's PrefixTuning do on the same model? Image-text models are
called with text and tuned as causal LMs (seq2seq LMs where they are encoder-decoders).

For each model type and method (PrefixTuningV2, IPT hybrid, IPT with an input-level prompt) the row records one of:
- ``ok``: the adapter moves the outputs, ``disable_adapter()`` gives the bare model's (to 1e-6), a padded row's
  outputs equal the row alone (where the bare model's do: learned-absolute-position decoders need ``position_ids``
  with or without an adapter), ``generate()`` with and without the cache gives the same scores (decoders and
  seq2seq), and the loss reaches every trainable parameter;
- ``refused``: ``get_peft_model`` (or the first call) raised peft-ipt's own error, naming the reason;
- ``FAIL``: anything else, with what failed (an invariant broken, or an error that is not ours).

peft's PrefixTuning on the same model: ``moves`` (its forward runs and changes the outputs), ``no effect`` (runs and
changes nothing: the prefix is silently dropped), or ``fails`` (raises). A model type whose generic tiny config
cannot be built, or whose bare tiny model fails on the inputs, is listed as such and not counted. The invariants are checked for the methods, not for
peft's PrefixTuning.

    python benchmarks/architectures.py                  # every model type (about 25 minutes on 2 cores)
    python benchmarks/architectures.py --types llama t5  # some

Writes results/architectures.json and .md.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from inspect import signature
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, markdown_table, write_outputs  # noqa: E402

VOCAB = 96
# One generic tiny config: each model type's config takes the fields it has. Key/value heads equal the query heads
# unless the model type takes grouped-query attention in its config.
GENERIC = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "num_labels": 3,
}
# Fields other model types name differently, set where the config has them.
ALIASES = {
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_inner": 64,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "num_layers": 2,
    "ffn_dim": 64,
    "embedding_size": 32,
    "word_embed_proj_dim": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "d_kv": 8,
    "d_ff": 64,
    "decoder_start_token_id": 2,
    "num_local_experts": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "sliding_window": 4,
    # multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, LongCat-Flash): small ranks, head parts summing to 8
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "cross_attention_hidden_size": 32,  # T5Gemma's decoder reads its encoder's width
    "rotary_dim": 4,  # GPT-J, CodeGen: rotary over part of the 8-wide heads
}
# Model types whose layer pattern or state-space sizes the generic config breaks: at least one attention layer in two
# layers, and sizes that divide.
TYPE_SETTINGS = {
    "jamba": {
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "use_mamba_kernels": False,
        "mamba_dt_rank": 4,
    },
    "bamba": {
        "attn_layer_indices": [1],
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 8,
        "mamba_chunk_size": 8,
    },
    "granitemoehybrid": {
        "layer_types": ["mamba", "attention"],
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 8,
        "mamba_chunk_size": 8,
    },
    "recurrent_gemma": {"block_types": ["recurrent", "attention"], "lru_width": 32},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 4},
    "zaya": {"num_experts_per_tok": 1},  # its config validates: one expert a token
    "prophetnet": {
        "num_encoder_layers": 2,
        "num_decoder_layers": 2,
        "num_encoder_attention_heads": 4,
        "num_decoder_attention_heads": 4,
        "ngram": 2,
    },
}
SEQ2SEQ_PAD = 1  # BART-like models pad with 1 and start the decoder with 2
# A generic config leaves a model type's sub-configs (a speech encoder's, a vision tower's) at their full size:
# such a model, counted on the meta device first, is not built (one such took 22 GB and was killed for memory).
MAX_PARAMETERS = 20_000_000
METHODS = ("prefix_v2", "ipt", "ipt_input")
# A check's time limit: TIMEOUT_S beyond three times its bare model's own runs (a method check runs the bare model's
# checks again, then its own: a model slow without the adapter, such as Falcon-H1 on the reference Mamba kernels,
# about 40 s a pass on a loaded CPU, is no hang). The bare runs get twice TIMEOUT_S.
TIMEOUT_S = 60
# where a multimodal config names its image placeholder token
IMAGE_TOKEN_FIELDS = ("image_token_id", "image_token_index")
IMAGE_TEXT = (
    "IMAGE_TEXT_TO_TEXT"  # a group, not a peft task type: tuned as a causal LM, or seq2seq if it is one
)
FOUR_LAYERS: set[str] = set()  # model types built with four layers (filled by sweep)


class TimedOut(Exception):
    pass


@contextmanager
def time_limit(seconds: int):
    def stop(*_):
        raise TimedOut

    signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)


def model_types() -> dict[str, list[str]]:
    from transformers.models.auto import modeling_auto as auto

    causal = sorted(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    seq2seq = sorted(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    encoders = sorted(set(auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES) - set(causal) - set(seq2seq))
    # image-text models mapped to no LM class above (Llava, PaliGemma, BLIP-2, Qwen2.5-VL...), called with text
    image_text = sorted(set(auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) - set(causal) - set(seq2seq))
    return {"CAUSAL_LM": causal, "SEQ_2_SEQ_LM": seq2seq, "SEQ_CLS": encoders, IMAGE_TEXT: image_text}


def _config(model_type: str, settings: dict):
    """The model type's config with ``settings``, leaving out those it cannot take (Falcon's derived head_dim,
    ProphetNet's num_hidden_layers)."""
    from transformers import AutoConfig

    settings = dict(settings)
    while True:
        try:
            return AutoConfig.for_model(model_type, **settings)
        except (AttributeError, NotImplementedError) as error:
            named = [k for k in settings if f"'{k}'" in str(error) or f"`{k}`" in str(error)]
            if not named:
                raise
            del settings[named[0]]


def _shrink(config, settings: dict) -> None:
    """Set ``settings`` on each sub-config of a config (a vision tower's, a speech encoder's, T5Gemma's halves),
    where it has the field and can take it."""
    from transformers import PretrainedConfig

    for sub in [v for v in vars(config).values() if isinstance(v, PretrainedConfig)]:
        for name, value in settings.items():
            settable = not isinstance(getattr(type(sub), name, None), property)
            if settable and hasattr(sub, name) and not isinstance(getattr(sub, name), PretrainedConfig):
                try:
                    setattr(sub, name, value)
                except Exception:  # a validated field: the sub-config keeps its own
                    pass
        _shrink(sub, settings)


def _small_images(config) -> None:
    """A vision tower's images at 2x2 patches, and the image placeholder inside the tiny vocabulary, so a call with
    an image stays short (see image_batch)."""
    vision = getattr(config, "vision_config", None)
    patch = getattr(vision, "patch_size", None)
    if isinstance(patch, int) and isinstance(getattr(vision, "image_size", None), int):
        try:
            vision.image_size = 2 * patch
        except Exception:  # a validated field: the tower keeps its size
            pass
    for name in IMAGE_TOKEN_FIELDS:
        if isinstance(getattr(config, name, None), int) and getattr(config, name) >= VOCAB:
            try:
                setattr(config, name, VOCAB - 1)
            except Exception:
                pass


def tiny_model(model_type: str, task: str):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    settings = dict(GENERIC) | TYPE_SETTINGS.get(model_type, {})
    if model_type in FOUR_LAYERS:
        settings["num_hidden_layers"] = 4
    if task == "SEQ_2_SEQ_LM":
        settings |= {"pad_token_id": SEQ2SEQ_PAD, "bos_token_id": 0, "forced_eos_token_id": None}
    probe = _config(model_type, settings)
    # the aliases the model type has go to the constructor too, so fields derived from them (DeepSeek's
    # qk_head_dim from its rotary and non-rotary parts) follow
    settings |= {k: v for k, v in ALIASES.items() if hasattr(probe, k)} | TYPE_SETTINGS.get(model_type, {})
    # grouped-query attention where the model type (or a sub-config) has it; multi-head latent attention has keys
    # and values for every head, and a head_dim of its rotary part
    latent = hasattr(probe, "kv_lora_rank")
    kv_heads = {"num_key_value_heads": GENERIC["num_attention_heads"] if latent else 2}
    if latent:
        settings["head_dim"] = ALIASES["qk_rope_head_dim"]
    if hasattr(probe, "num_key_value_heads"):
        settings |= kv_heads
    config = _config(model_type, settings)
    if hasattr(probe, "num_key_value_heads"):
        config.num_key_value_heads = kv_heads["num_key_value_heads"]
    _shrink(config, ALIASES | kv_heads | {k: v for k, v in settings.items() if k != "num_labels"})
    _small_images(config)
    auto = {
        "CAUSAL_LM": AutoModelForCausalLM,
        "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM,
        IMAGE_TEXT: AutoModelForImageTextToText,
    }
    builder = auto.get(task, AutoModelForSequenceClassification)
    with torch.device("meta"):
        count = sum(p.numel() for p in builder.from_config(config).parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"the generic config gives {count / 1e6:.0f}M parameters (sub-configs keep their sizes)"
        )
    torch.manual_seed(0)
    return builder.from_config(config).eval()


def method_config(method: str, task: str):
    from peft_ipt import InstancePromptConfig, PrefixTuningV2Config

    if method == "prefix_v2":
        return PrefixTuningV2Config(task_type=task, prefix_length=3, init_weights=False)
    injection = "input" if method == "ipt_input" else "hybrid"
    return InstancePromptConfig(task_type=task, prompt_length=3, injection=injection, init_weights=False)


def inputs(task: str) -> dict[str, torch.Tensor]:
    """Two rows, the second right-padded by 2 (left-padded by 2 for decoders)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    pad = SEQ2SEQ_PAD if task == "SEQ_2_SEQ_LM" else 0
    if task == "CAUSAL_LM":
        ids[1, :2], mask[1, :2] = pad, 0
    else:
        ids[1, 5:], mask[1, 5:] = pad, 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "SEQ_2_SEQ_LM":
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 4), generator=generator)
    return batch


def row_alone(batch: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    kept = batch["attention_mask"][1].bool()
    alone = {"input_ids": batch["input_ids"][1:, kept], "attention_mask": batch["attention_mask"][1:, kept]}
    if task == "SEQ_2_SEQ_LM":
        alone["decoder_input_ids"] = batch["decoder_input_ids"][1:]
    return alone


def image_batch(model, task: str) -> dict[str, torch.Tensor] | None:
    """A causal LM's two rows (the second left-padded by 2) with one random image each, its placeholder tokens (as
    many as the model's get_image_features gives) after the first two; None where the config alone cannot build
    such a call (an image size per tile, grids, aspect ratios)."""
    config = model.config
    token = next(
        (getattr(config, n) for n in IMAGE_TOKEN_FIELDS if isinstance(getattr(config, n, None), int)), None
    )
    vision = getattr(config, "vision_config", None)
    size = getattr(vision, "image_size", None)
    if (
        task != "CAUSAL_LM"
        or token is None
        or not isinstance(size, int)
        or not hasattr(model, "get_image_features")
    ):
        return None
    channels = getattr(vision, "num_channels", 3)
    pixels = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(2))
    try:
        with torch.no_grad():
            features = model.get_image_features(pixel_values=pixels)
    except Exception:
        return None
    features = getattr(features, "pooler_output", features)
    features = (
        torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
        if isinstance(features, (list, tuple))
        else features
    )
    if not torch.is_tensor(features) or features.reshape(-1, features.shape[-1]).shape[0] % 2:
        return None
    n = features.reshape(-1, features.shape[-1]).shape[0] // 2
    batch = inputs(task)
    ids = torch.cat([batch["input_ids"][:, :2], torch.full((2, n), token), batch["input_ids"][:, 2:]], 1)
    ids = ids.masked_fill(ids == token, VOCAB - 2) if token != VOCAB - 2 else ids
    ids[:, 2 : 2 + n] = token
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def image_gap(model, batch) -> float:
    """How far the left-padded row of an image call is from the row alone with its image."""
    together = model(**batch).logits[1, 2:]
    alone = model(input_ids=batch["input_ids"][1:, 2:], pixel_values=batch["pixel_values"][1:]).logits[0]
    return (together - alone).abs().max().item()


def check_images(model_type: str, task: str) -> tuple[str, str]:
    """(verdict, detail) for a call with images (prefix_v2): it runs where the bare model's does, disable_adapter()
    gives the bare model's, and the left-padded row equals the row alone where the bare model's does."""
    import peft

    base = tiny_model(model_type, task)
    task_type, task = peft_task(base, task), input_layout(base, task)
    batch = image_batch(base, task)
    if batch is None:
        return "-", ""
    try:
        with torch.no_grad():
            bare = base(**batch).logits
            bare_gap = image_gap(base, batch)
    except Exception:
        return "-", "the bare model fails on the image call"
    model = peft.get_peft_model(base, method_config("prefix_v2", task_type)).eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            off = (model(**batch).logits - bare).abs().max().item()
        gap = image_gap(model, batch)
    problems = []
    if not (adapted - bare).abs().max().item() > 1e-6:
        problems.append("the adapter changes nothing")
    if off > 1e-6:
        problems.append(f"disable_adapter is {off:.1e} off the bare model")
    if gap > max(1e-4, 10 * bare_gap):
        problems.append(f"the left-padded row is {gap:.1e} off its outputs alone (bare model {bare_gap:.1e})")
    return ("FAIL", "; ".join(problems)) if problems else ("ok", "")


def padded_gap(model, batch, task) -> float:
    """How far the padded row's outputs are from the row alone."""
    together = model(**batch).logits[1]
    alone = model(**row_alone(batch, task)).logits[0]
    if task == "CAUSAL_LM":
        together = together[2:]
    return (together - alone).abs().max().item()


def generate_drift(model, batch) -> float:
    """How far generate()'s scores with the cache are from those without it."""
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    call = {k: v for k, v in batch.items() if k != "decoder_input_ids"}
    cached = model.generate(**call, **kwargs)
    uncached = model.generate(**call, use_cache=False, **kwargs)
    return max((a - b).abs().max().item() for a, b in zip(cached.scores, uncached.scores, strict=True))


def bare_runs(model_type: str, task: str) -> None:
    """Raise where the tiny model without an adapter fails on the inputs (forward, generate): a generic-config
    artefact, not counted."""
    model = tiny_model(model_type, task)
    from peft_ipt.attention import text_config_of

    kinds = getattr(text_config_of(model.config), "layer_types", None) or ["attention"]
    if model_type not in FOUR_LAYERS and not any("attention" in kind for kind in kinds):
        # a hybrid whose two tiny layers hold no attention (LFM3's first attention layer is its third): four layers
        FOUR_LAYERS.add(model_type)
        model = tiny_model(model_type, task)
    task = input_layout(model, task)
    batch = inputs(task)
    with torch.no_grad():
        model(**batch)
        model(**row_alone(batch, task))
        if task != "SEQ_CLS":
            generate_drift(model, batch)


def input_layout(model, task: str) -> str:
    """The task whose inputs a model reads: a decoder-only model under the seq2seq mapping (Qwen2-Audio, Voxtral)
    reads a causal LM's, and its logits cover the input; an image-text model a causal LM's or a seq2seq LM's."""
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    if task in ("SEQ_2_SEQ_LM", IMAGE_TEXT) and not encoder_decoder:
        return "CAUSAL_LM"
    return "SEQ_2_SEQ_LM" if task == IMAGE_TEXT else task


def peft_task(model, task: str) -> str:
    """The task_type a user gives: the group's, or for an image-text model the one its inputs are."""
    return input_layout(model, task) if task == IMAGE_TEXT else task


def check_method(model_type: str, task: str, method: str) -> tuple[str, str]:
    """(verdict, detail) for one method on one model type."""
    import peft

    from peft_ipt.attention import UnsupportedModelError

    base = tiny_model(model_type, task)
    task_type, task = peft_task(base, task), input_layout(base, task)
    batch = inputs(task)
    with torch.no_grad():
        bare = base(**batch).logits
        bare_gap = padded_gap(base, batch, task)
        bare_drift = generate_drift(base, batch) if task != "SEQ_CLS" else 0.0
    try:
        model = peft.get_peft_model(base, method_config(method, task_type)).eval()
        with torch.no_grad():
            adapted = model(**batch).logits
    except (UnsupportedModelError, ValueError) as error:
        return "refused", str(error).split(". ")[0][:140]
    with torch.no_grad():
        moved = (adapted - bare).abs().max().item()
        with model.disable_adapter():
            off = (model(**batch).logits - bare).abs().max().item()
        gap = padded_gap(model, batch, task)
    problems = []
    if not moved > 1e-6:
        problems.append(f"the adapter changes nothing ({moved:.1e})")
    if off > 1e-6:  # float noise only: LoRA's get_peft_model and unload move FSMT by 4e-8 too
        problems.append(f"disable_adapter is {off:.1e} off the bare model")
    if gap > max(1e-4, 10 * bare_gap):
        problems.append(f"a padded row is {gap:.1e} off its outputs alone (bare model {bare_gap:.1e})")
    if task != "SEQ_CLS":
        try:
            with torch.no_grad():
                drift = generate_drift(model, batch)
        except ValueError as error:  # generate() refused; the forward pass works
            return "refused", "generate(): " + str(error).split(". ")[0][:140]
        if drift > max(1e-4, 10 * bare_drift):
            problems.append(
                f"generate() with the cache is {drift:.1e} off generate() without (bare {bare_drift:.1e})"
            )
    model.train()
    labels = batch["decoder_input_ids"] if task == "SEQ_2_SEQ_LM" else None
    if task == "CAUSAL_LM":
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        labels[:, :4] = -100  # the source the instance prompt reads
    if task == "SEQ_CLS":
        labels = torch.tensor([0, 1])
    # Molmo 2 asks for its token types (text: 0) in training, adapter or not
    types = (
        {"mm_token_type_ids": torch.zeros_like(batch["input_ids"])}
        if "mm_token_type_ids" in signature(type(base).forward).parameters
        else {}
    )
    model(**batch, **types, labels=labels).loss.backward()
    silent = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    if silent:
        problems.append(f"no gradient reaches {silent[0]}")
    note = "needs position_ids, as the bare model does" if bare_gap > 1e-4 else ""
    return ("FAIL", "; ".join(problems)) if problems else ("ok", note)


def check_peft(model_type: str, task: str) -> str:
    import peft

    base = tiny_model(model_type, task)
    task_type, task = peft_task(base, task), input_layout(base, task)
    batch = inputs(task)
    try:
        with torch.no_grad():
            bare = base(**batch).logits
            config = peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=3)
            model = peft.get_peft_model(base, config)
            moved = (model(**batch).logits - bare).abs().max().item()
    except Exception as error:
        return f"fails ({type(error).__name__})"
    return "moves" if moved > 1e-6 else "no effect"


def sweep(task: str, model_type: str) -> dict:
    row = {"task": task, "model_type": model_type}
    start = time.monotonic()
    try:
        with time_limit(2 * TIMEOUT_S):
            try:
                bare_runs(model_type, task)
            except ValueError as error:
                if "get_mask_sizes" not in str(error):
                    raise
                FOUR_LAYERS.add(model_type)  # a hybrid whose first attention layer comes later: four layers
                bare_runs(model_type, task)
    except (Exception, TimedOut) as error:
        row["built"] = f"{type(error).__name__}: {str(error)[:100]}"
        return row
    row["built"] = "yes"
    limit = TIMEOUT_S + 3 * math.ceil(time.monotonic() - start)
    for method in METHODS:
        try:
            with time_limit(limit):
                row[method] = check_method(model_type, task, method)
        except TimedOut:
            row[method] = ("FAIL", f"timed out after {limit} s")
        except Exception as error:
            row[method] = ("FAIL", f"{type(error).__name__}: {str(error)[:140]}")
    try:
        with time_limit(limit):
            row["images"] = check_images(model_type, task)
    except TimedOut:
        row["images"] = ("FAIL", f"timed out after {limit} s")
    except Exception as error:
        row["images"] = ("FAIL", f"{type(error).__name__}: {str(error)[:140]}")
    try:
        with time_limit(limit):
            row["peft_prefix_tuning"] = check_peft(model_type, task)
    except TimedOut:
        row["peft_prefix_tuning"] = "fails (timed out)"
    return row


def report(rows: list[dict]) -> str:
    import peft
    import transformers

    built = [r for r in rows if r["built"] == "yes"]
    lines = [
        f"# Model types: tiny random models (transformers {transformers.__version__}, peft {peft.__version__})",
        "",
        "Command: `python benchmarks/architectures.py`. Each model type's tiny model is built from one generic "
        "config; `ok`: the adapter moves the outputs, `disable_adapter()` gives the bare model's (to 1e-6), a padded "
        "row equals the row alone (where the bare model's does), generate() with and without the cache agree, and "
        "the loss reaches every trainable parameter; `refused`: peft-ipt's own error at `get_peft_model` or the "
        "first call. `images` (prefix_v2, causal LMs whose config alone builds a call with an image: its "
        "placeholder tokens, as many as get_image_features gives, and 2x2 patches): `ok` where the call runs, "
        "`disable_adapter()` gives the bare model's and the left-padded row with its image equals the row alone; "
        "`-` where no such call is built. peft's PrefixTuning: `moves` (runs and changes the outputs), `no effect` "
        "(runs, changes nothing), `fails`.",
        "",
    ]
    for task in ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", IMAGE_TEXT):
        group = [r for r in built if r["task"] == task]
        if not group:
            continue
        counts = {m: Counter(r[m][0] for r in group) for m in METHODS}
        peft_counts = Counter(r["peft_prefix_tuning"].split(" (")[0] for r in group)
        image_counts = Counter(r.get("images", ("-", ""))[0] for r in group)
        lines.append(f"## {task}: {len(group)} model types built")
        lines.append("")
        for method in METHODS:
            lines.append(f"- {method}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts[method].items())))
        lines.append("- images: " + ", ".join(f"{k} {v}" for k, v in sorted(image_counts.items())))
        lines.append("- peft PrefixTuning: " + ", ".join(f"{k} {v}" for k, v in sorted(peft_counts.items())))
        lines.append("")
        table = [
            [
                r["model_type"],
                *(_cell(r[m]) for m in METHODS),
                _cell(r.get("images", ("-", ""))),
                r["peft_prefix_tuning"],
            ]
            for r in sorted(group, key=lambda r: r["model_type"])
        ]
        lines.append(markdown_table(["model type", *METHODS, "images", "peft PrefixTuning"], table))
        lines.append("")
    skipped = sorted(f"{r['model_type']} ({r['task']})" for r in rows if r["built"] != "yes")
    lines.append(
        "Not built from the generic tiny config, or the bare tiny model fails on the inputs (not counted): "
        f"{', '.join(skipped) or 'none'}."
    )
    return "\n".join(lines)


def _cell(result) -> str:
    verdict, detail = result
    return f"{verdict}: {detail}" if detail else verdict


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="*", help="model types (default: every one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(1)
    import peft_ipt  # noqa: F401  (registers the methods)

    rows, start = [], time.time()
    groups = model_types()
    todo = [(t, m) for t, types in groups.items() for m in types if not args.types or m in args.types]
    from tqdm import tqdm

    for task, model_type in tqdm(todo, unit="type"):
        rows.append(sweep(task, model_type))
    document = {"rows": rows, "seconds": round(time.time() - start)}
    if args.types:
        print(report(rows))
        return
    write_outputs("architectures", document, report(rows), args.out)


if __name__ == "__main__":
    main()
