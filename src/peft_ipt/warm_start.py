"""Start an adapter from a trained PrefixTuningV2 prefix: train that prefix on, or add IPT's instance part on top of it.

:func:`start_from_prefix` copies a saved PrefixTuningV2 adapter's prefix, and the heads trained beside it
(``modules_to_save``, e.g. a classifier), into a freshly built adapter:

- into a PrefixTuningV2 adapter with the same shapes: a warm start with a fresh optimizer and schedule;
- into an IPT adapter with ``injection='hybrid'``: the saved prefix becomes its task-level prefix. Its instance heads
  start at zero (``init_weights=True``), so the model starts computing exactly what the saved prefix computed, and
  training adds the instance-wise part to a task prompt that has already converged.

Both starts from one saved prefix make a paired comparison of the instance part alone: the prefix trained on, against
IPT on that prefix, from the same function, data order and budget.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel


def _target_tables(model: PeftModel, adapter_name: str) -> tuple[nn.ModuleDict, str]:
    """The adapter's prefix tables that take the saved ones, and a description of what they are."""
    from .instance_prompt import InstancePromptModel
    from .prefix_tuning import PrefixTuningV2Model

    tuner = model.base_model
    if not isinstance(tuner, (InstancePromptModel, PrefixTuningV2Model)):
        raise TypeError(
            f"start_from_prefix needs a PeftModel with an InstancePromptConfig or PrefixTuningV2Config adapter "
            f"(got a {type(model).__name__} wrapping {type(tuner).__name__})"
        )
    if adapter_name not in tuner.prompt_modules:
        raise ValueError(f"adapter {adapter_name!r} not found; available: {list(tuner.prompt_modules)}")
    module = tuner.prompt_modules[adapter_name]
    config = tuner.peft_config[adapter_name]
    if isinstance(tuner, PrefixTuningV2Model):
        return module.tables, "prefix"
    if config.injection != "hybrid":
        raise ValueError(
            f"start_from_prefix puts the saved prefix under IPT's task-level prefix, which only injection='hybrid' "
            f"has (got injection={config.injection!r}); use injection='hybrid'"
        )
    for kind, head in module.heads.items():
        if head.weight.count_nonzero() or head.bias.count_nonzero():
            raise ValueError(
                f"adapter {adapter_name!r}'s instance heads ({kind}) are not at zero, so the model would not start as "
                "the saved prefix: start from a freshly built IPT adapter with init_weights=True"
            )
    return module.task, "task-level prefix"


def _check_config(saved, target, path: str) -> None:
    """The config fields that fix the tables' shapes, saved against target, each mismatch named with its fix."""
    from .instance_prompt import InstancePromptConfig

    if saved.task_type != target.task_type:
        raise ValueError(
            f"{path} holds a {saved.task_type} adapter, but this adapter's task_type is {target.task_type!r}: "
            "start from a prefix trained for the same task type"
        )
    if isinstance(target, InstancePromptConfig):
        length, length_field = target.prompt_length, "prompt_length"
        hidden, hidden_field = target.task_prefix_hidden_size, "task_prefix_hidden_size"
    else:
        length, length_field = target.prefix_length, "prefix_length"
        hidden = target.encoder_hidden_size if target.reparameterize else None  # fold() clears it
        hidden_field = "encoder_hidden_size (with reparameterize=True)"
    if saved.prefix_length != length:
        raise ValueError(
            f"{path} holds a prefix of length {saved.prefix_length}, but this adapter's {length_field} is {length}: "
            f"set {length_field}={saved.prefix_length}"
        )
    saved_hidden = saved.encoder_hidden_size if saved.reparameterize else None
    if saved_hidden != hidden:
        saved_kind = (
            "a flat prefix" if saved_hidden is None else f"an MLP-reparameterised prefix (h={saved_hidden})"
        )
        fix = "None (flat)" if saved_hidden is None else saved_hidden
        raise ValueError(
            f"{path} holds {saved_kind}, but this adapter's {hidden_field} is {hidden}: set {hidden_field} to {fix}"
        )


def _modules_to_save(model: PeftModel, adapter_name: str) -> dict[str, nn.Module]:
    """name in the saved file's key space -> the adapter's trainable copy of that module."""
    from peft.utils.other import ModulesToSaveWrapper

    return {
        name: wrapper.modules_to_save[adapter_name]
        for name, wrapper in model.named_modules()
        if isinstance(wrapper, ModulesToSaveWrapper) and adapter_name in wrapper.modules_to_save
    }


@torch.no_grad()
def start_from_prefix(
    model: PeftModel, prefix_adapter: str | os.PathLike, adapter_name: str | None = None
) -> None:
    """Start ``model``'s adapter (a fresh PrefixTuningV2 or hybrid IPT adapter) from the trained PrefixTuningV2
    adapter saved in the folder ``prefix_adapter`` (``save_pretrained``'s, or a ``peft-ipt train`` output)::

        model = get_peft_model(base, InstancePromptConfig(task_type="SEQ_CLS", prompt_length=16))
        peft_ipt.start_from_prefix(model, "prefix-run")  # IPT now computes what the trained prefix computed
        trainer.train()                                  # and learns the instance part on top of it

    The prefix and the heads trained beside it (``modules_to_save``) are copied; everything else keeps its
    initialisation. The folder is vetted as ``PeftModel.from_pretrained`` vets it (digest, truncation, pickles).
    Any mismatch (another method's adapter, another prefix length, flat against reparameterised, other layers or
    heads) raises before a weight is copied.
    """
    from peft.utils import load_peft_weights

    from .prefix_tuning import PrefixTuningV2Config

    path = str(prefix_adapter)
    if not (Path(path) / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"start_from_prefix: {path} has no adapter_config.json; give the folder a PrefixTuningV2 adapter was "
            "saved to (save_pretrained, or a `peft-ipt train` output)"
        )
    adapter_name = adapter_name or model.active_adapter
    tables, what = _target_tables(model, adapter_name)
    peft_type = json.loads((Path(path) / "adapter_config.json").read_text()).get("peft_type")
    if peft_type != PrefixTuningV2Config().peft_type:
        raise ValueError(
            f"{path} holds a {peft_type} adapter; start_from_prefix starts from a PrefixTuningV2 adapter "
            "(PrefixTuningV2Config)"
        )
    saved = PrefixTuningV2Config.from_pretrained(
        path
    )  # vets the weights beside it, as PeftModel.from_pretrained
    _check_config(saved, model.peft_config[adapter_name], path)

    state = load_peft_weights(path, device="cpu")
    marker = "prefix_v2_encoder.prompt.tables."
    prompt_state = {key.split(marker, 1)[1]: value for key, value in state.items() if marker in key}
    expected = tables.state_dict()
    if prompt_state.keys() != expected.keys():
        raise ValueError(
            f"{path}'s prefix has tables {sorted(prompt_state)}, but this adapter's {what} has {sorted(expected)}: "
            "the two must prefix the same attention kinds (encoder_prefix / decoder_prefix / cross_prefix)"
        )
    for key, value in prompt_state.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{path}'s prefix table {key} has shape {tuple(value.shape)}, but this adapter's {what} has "
                f"{tuple(expected[key].shape)}: the two must prefix the same layers (layers_to_transform) of the "
                "same base model"
            )

    heads = _modules_to_save(model, adapter_name)
    head_state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, value in state.items():
        if marker in key:
            continue
        owner = next((name for name in heads if key.startswith(name + ".")), None)
        if owner is None:
            raise ValueError(
                f"{path} holds {key}, trained beside its prefix, but this adapter trains no such module: build the "
                "adapter with the same task_type and modules_to_save as the saved one"
            )
        target = heads[owner].get_parameter(key[len(owner) + 1 :])
        if value.shape != target.shape:
            raise ValueError(
                f"{path}'s {key} has shape {tuple(value.shape)}, but this model's has {tuple(target.shape)}: the "
                "saved head was trained for another label count or base model"
            )
        head_state[key] = (value, target)
    untouched = [
        f"{name}.{param}"
        for name, module in heads.items()
        for param, _ in module.named_parameters()
        if f"{name}.{param}" not in head_state
    ]
    if untouched:
        raise ValueError(
            f"this adapter trains {untouched[0]} (modules_to_save), which {path} does not hold, so the model would "
            "not start as the saved prefix: build the adapter with the saved one's task_type and modules_to_save"
        )

    for key, value in prompt_state.items():
        expected[key].copy_(value)  # state_dict() tensors share the parameters' storage
    for value, target in head_state.values():
        target.copy_(value)
    module = model.base_model.prompt_modules[adapter_name]
    for cache in ("_cache", "_last_task"):
        if hasattr(module, cache):
            setattr(module, cache, None)
