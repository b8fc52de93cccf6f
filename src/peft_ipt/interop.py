"""Moving a prefix between PrefixTuningV2 and peft's own ``PrefixTuningConfig`` adapters, both ways.

Both methods store the same thing: per virtual token, every layer's key and value,

    peft   ``prompt_embeddings``        (P, num_layers * 2 * token_dim)   read as view(P, L, 2, heads, head_dim)
    ours   ``tables["self"].weight``    (P, L * 2 * n_kv * head_dim)      read as view(P, L, 2, n_kv, head_dim)

where peft, for grouped-query attention, sets ``num_attention_heads = num_key_value_heads`` and
``token_dim = num_key_value_heads * head_dim`` (``peft.utils.other._prepare_prompt_learning_config``). So the two
matrices are the same numbers in the same order: :func:`export_to_peft_prefix_tuning` writes ours as peft's
``prompt_embeddings``, :func:`import_from_peft_prefix_tuning` reads peft's into a flat PrefixTuningV2 adapter.

What can cross over: a prefix on the self-attention of every layer of a decoder-only or encoder-only model, with
a task type peft's ``PeftModelFor<Task>`` applies a prefix for (CAUSAL_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS,
FEATURE_EXTRACTION). peft has no equivalent of the rest, so exporting it raises ``ValueError``:
- encoder-decoder models: peft's prefix covers decoder self-attention only (one table, ``num_transformer_submodules
  = 2``); ours has separate encoder, decoder and cross-attention tables;
- ``layers_to_transform`` subsets: peft prefixes every layer, and a zero prefix is not "no prefix" (its keys
  still take softmax mass);
- prefixes on cross-attention of a decoder-only model, InstancePrompt adapters (input-dependent, not a table),
  and ``task_type=None`` (peft's plain ``PeftModel`` never applies a prompt-learning prefix).
``prefix_dropout`` is training-only and peft has none; the exported values are the prefix without dropout. A
reparameterised adapter is exported as the keys/values its MLP computes (as :meth:`fold` would give, but on a copy:
the user's model keeps its MLP). peft's own ``prefix_projection`` MLP (embedding width ``token_dim``) is a different
network, so the export is always ``prefix_projection=False``. In the other direction, peft always saves computed
keys/values (``get_prompt_embedding_to_save`` runs its MLP), so adapters trained with or without
``prefix_projection`` import the same way.

Where the two give different logits for the same numbers: positions. peft passes the prefix to the model as a
``past_key_values`` cache of length P, so the model numbers the real tokens P, P+1, ... (``cache_position`` /
``past_key_values_length``; peft even adds P to ``position_ids`` the caller passes, ``_adjust_prompt_learning_kwargs``).
Ours never touches the cache or the positions: the tokens keep 0, 1, .... Keys, values, masks and the causal
structure are otherwise identical, so (checked on tiny random models, every task type above, with and without
padding):
- on a model without position information, e.g. ``SmolLM3Config(no_rope_layers=[0] * num_layers)`` (NoPE on every
  layer), the logits are bit-for-bit equal;
- on any model, ours called with ``position_ids = arange(T) + P`` reproduces peft's logits exactly; for learned
  absolute positions (GPT-2, BERT, RoBERTa) the two otherwise read other rows of the position table, and for RoPE
  (Llama) attention among real tokens is unchanged (relative) but each query meets the prefix keys (unrotated in
  both) at angle ``i + P`` instead of ``i``.
Models that place keys by their index in tables of their own differ in where the prefix sits as well: peft's
prefix takes the first P indices, ours none (Bloom and Falcon give it the first token's ALiBi position, MPT the
ALiBi bias of distance zero from each query, GPT-Neo's local layers see it from every query, where peft's falls out
of their window). So a prefix trained with one method is a good starting point for the other, but not the same
function on positional models; fine-tune briefly after moving it if exact behaviour matters.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, PrefixTuningConfig, get_peft_model
from peft.utils import PeftType, get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from peft.utils.other import _prepare_prompt_learning_config
from safetensors.torch import save_file
from torch import nn

from .attention import SELF, attention_path_for, layout_of
from .prefix_tuning import PrefixTuningV2Config, PrefixTuningV2Model

# Task types whose PeftModelFor<Task> feeds a PrefixTuning prefix to a decoder-only or encoder-only model.
EXPORTABLE_TASKS = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
PEFT_WEIGHT = "prompt_embeddings"
WEIGHTS_NAME = "adapter_model.safetensors"


def _check_exportable(peft_model: PeftModel, adapter_name: str) -> tuple[PrefixTuningV2Config, nn.Module]:
    """The adapter's config and prompt module, after refusing everything peft's PrefixTuning cannot represent."""
    if adapter_name not in getattr(peft_model, "peft_config", {}):
        available = list(getattr(peft_model, "peft_config", {}))
        raise ValueError(f"adapter_name={adapter_name!r} not found; available adapters: {available}")
    config = peft_model.peft_config[adapter_name]
    if not isinstance(config, PrefixTuningV2Config) or not isinstance(
        peft_model.base_model, PrefixTuningV2Model
    ):
        raise ValueError(
            f"adapter {adapter_name!r} uses {type(config).__name__}; only PrefixTuningV2 adapters have a "
            "task-level key/value table that peft's PrefixTuning can hold"
        )
    base = peft_model.get_base_model()
    if getattr(base.config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(base).__name__} is an encoder-decoder model: peft's PrefixTuning has one prefix, in decoder "
            "self-attention only, while this adapter has encoder/decoder/cross tables; it cannot be exported"
        )
    if config.task_type not in EXPORTABLE_TASKS:
        raise ValueError(
            f"task_type={config.task_type!r} cannot be exported: peft applies a PrefixTuning prefix only for "
            f"task_type in {EXPORTABLE_TASKS} on decoder-only / encoder-only models"
        )
    module = peft_model.base_model.prompt_modules[adapter_name]
    kinds = sorted(module.tables)
    if kinds != [SELF]:
        raise ValueError(
            f"the adapter has prefixes on {kinds} attention; peft's PrefixTuning has self-attention prefixes only. "
            "Set cross_prefix=False to train an exportable adapter"
        )
    layout = peft_model.base_model.layout
    _refuse_mixed_shapes(layout, "exported to")
    n_layers = layout.shapes[SELF][0]
    if sorted(module.layer_slots[SELF]) != list(range(n_layers)):
        raise ValueError(
            f"layers_to_transform={config.layers_to_transform}: peft's PrefixTuning puts a prefix on every layer "
            f"(0..{n_layers - 1}) and has no way to leave layers out; only adapters with layers_to_transform=None "
            "can be exported"
        )
    return config, module


def _refuse_mixed_shapes(layout, direction: str) -> None:
    if SELF in layout.shapes and not layout.uniform(SELF):
        shapes = sorted(set(layout.layer_shapes[SELF].values()))
        raise ValueError(
            f"this model's self-attention layers differ in shape, or their keys and values in size ({shapes} "
            "key/value heads, key size, value size; Gemma 4's sliding and global layers differ, DeepSeek's latent "
            "attention has values narrower than its keys), and peft's PrefixTuning gives every layer one shape with "
            f"keys and values of one size, so the prefix cannot be {direction} peft's PrefixTuning. Keep the "
            "adapter as a PrefixTuningV2 adapter"
        )


def _peft_config_for(peft_model: PeftModel, config: PrefixTuningV2Config) -> PrefixTuningConfig:
    n_layers, n_kv, head_dim = peft_model.base_model.layout.shapes[SELF]
    modules_to_save = list(dict.fromkeys(config.modules_to_save)) if config.modules_to_save else None
    exported = PrefixTuningConfig(
        task_type=config.task_type,
        num_virtual_tokens=config.prefix_length,
        num_layers=n_layers,
        num_attention_heads=n_kv,
        token_dim=n_kv * head_dim,
        encoder_hidden_size=n_kv * head_dim,
        prefix_projection=False,
        num_transformer_submodules=1,
        modules_to_save=modules_to_save,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    # peft recomputes the head layout of GQA models from the model config when it loads the adapter; make sure it
    # lands on ours, or the exported numbers would be cut into the wrong heads.
    seen = _prepare_prompt_learning_config(copy.deepcopy(exported), peft_model.get_base_model().config)
    if (seen.num_layers, seen.num_attention_heads, seen.token_dim) != (n_layers, n_kv, n_kv * head_dim):
        raise ValueError(
            f"peft would read this model as (layers, kv heads, token_dim) = "
            f"{(seen.num_layers, seen.num_attention_heads, seen.token_dim)}, but its attention has "
            f"{(n_layers, n_kv, n_kv * head_dim)}; the prefix cannot be exported to peft's PrefixTuning"
        )
    return exported


@torch.no_grad()
def export_to_peft_prefix_tuning(
    peft_model: PeftModel, output_dir: str | os.PathLike, adapter_name: str = "default"
) -> PrefixTuningConfig:
    """Write a PrefixTuningV2 adapter as a standard peft ``PrefixTuningConfig`` adapter folder.

    ``output_dir`` gets ``adapter_config.json`` and ``adapter_model.safetensors``, loadable without peft-ipt by
    ``PeftModel.from_pretrained(base_model, output_dir)``. The task head (``modules_to_save``) goes along. A
    reparameterised adapter is exported as the keys/values its MLP computes; ``peft_model`` is not changed.
    Raises ``ValueError`` for what peft's PrefixTuning cannot hold (see the module docstring), and note that
    logits agree with peft's only on models without position information: peft shifts positions by P.
    Returns the written config.
    """
    config, module = _check_exportable(peft_model, adapter_name)
    exported = _peft_config_for(peft_model, config)
    # table() is the MLP's output (or the flat weight): a fresh tensor, never the user's parameter in place.
    prefix = module.tables[SELF]().detach().to("cpu", copy=True).contiguous()  # (P, L * 2 * n_kv * head_dim)
    state = {PEFT_WEIGHT: prefix}
    ours_prefix = f"base_model.{PrefixTuningV2Model.modules_attr}."
    for key, value in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items():
        if key.startswith(ours_prefix):
            continue
        # The task head: peft's prompt-learning models hold the transformers model directly as base_model.
        state[key.replace("base_model.model.", "base_model.", 1)] = value.detach().to("cpu").contiguous()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    exported.save_pretrained(str(output_dir))
    save_file(state, str(output_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    return exported


def import_from_peft_prefix_tuning(
    base_model: nn.Module,
    peft_adapter_dir: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> PeftModel:
    """Load a peft ``PrefixTuningConfig`` adapter as a flat PrefixTuningV2 adapter with the same keys/values.

    Like ``PeftModel.from_pretrained``, this wraps ``base_model`` in place. The task head saved with the adapter
    is loaded too. ``is_trainable=True`` leaves the prefix (and head) trainable. Raises ``ValueError`` for peft
    adapters of another type, seq2seq prefixes, or a base model of other shapes than the adapter was saved for.
    """
    peft_config = PeftConfig.from_pretrained(str(peft_adapter_dir))
    if peft_config.peft_type != PeftType.PREFIX_TUNING:
        raise ValueError(
            f"{peft_adapter_dir} holds a {peft_config.peft_type} adapter; import_from_peft_prefix_tuning reads "
            "peft PREFIX_TUNING adapters"
        )
    if peft_config.num_transformer_submodules != 1 or getattr(base_model.config, "is_encoder_decoder", False):
        raise ValueError(
            "peft's encoder-decoder prefixes (num_transformer_submodules=2, decoder self-attention only) cannot be "
            "imported; only decoder-only / encoder-only PrefixTuning adapters can"
        )
    weights = load_peft_weights(str(peft_adapter_dir), device="cpu")
    if PEFT_WEIGHT not in weights:
        raise ValueError(
            f"{peft_adapter_dir} has no {PEFT_WEIGHT!r} tensor; it is not a PrefixTuning adapter"
        )
    prefix = weights.pop(PEFT_WEIGHT)  # (P, L * 2 * token_dim)
    # Check the shapes before get_peft_model wraps base_model, so that a refusal leaves it untouched.
    # the sites of the path the prefix will take (the registry's, or an architecture's own: Bloom, MPT, ...)
    layout = layout_of(attention_path_for(base_model).sites(base_model))
    _refuse_mixed_shapes(layout, "imported from")
    n_layers, n_kv, head_dim = layout.shapes[SELF]
    saved = (peft_config.num_layers, peft_config.num_attention_heads, peft_config.token_dim)
    expected = (peft_config.num_virtual_tokens, n_layers * 2 * n_kv * head_dim)
    if saved != (n_layers, n_kv, n_kv * head_dim) or tuple(prefix.shape) != expected:
        raise ValueError(
            f"the peft adapter was saved for (layers, heads, token_dim) = {saved} with prompt_embeddings of shape "
            f"{tuple(prefix.shape)}, but this model's attention has {(n_layers, n_kv, n_kv * head_dim)} (expects "
            f"{expected}); load it onto the base model it was trained on"
        )

    modules_to_save = (
        list(dict.fromkeys(peft_config.modules_to_save)) if peft_config.modules_to_save else None
    )
    config = PrefixTuningV2Config(
        task_type=peft_config.task_type,
        prefix_length=peft_config.num_virtual_tokens,
        reparameterize=False,
        cross_prefix=False,  # peft's prefix is on self-attention only, also where a decoder has cross-attention
        modules_to_save=modules_to_save,
        base_model_name_or_path=peft_config.base_model_name_or_path,
        revision=peft_config.revision,
        inference_mode=not is_trainable,
    )
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    table = model.base_model.prompt_modules[adapter_name].tables[SELF]
    with torch.no_grad():
        table.weight.copy_(prefix.to(table.weight.device, table.weight.dtype))
    if weights:  # the task head, stored by peft relative to the transformers model
        head = {key.replace("base_model.", "base_model.model.", 1): value for key, value in weights.items()}
        result = set_peft_model_state_dict(model, head, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise ValueError(
                f"the peft adapter holds weights this model has no place for: {result.unexpected_keys}; "
                "check that base_model has the same task head"
            )
    return model
