"""PrefixTuningV2Model: the peft tuner for PrefixTuningV2Config."""

from __future__ import annotations

import torch
from torch import nn

from ..attention import SiteLayout
from ..base_config import hidden_size_of
from ..tuner import PromptTuner
from .config import PrefixTuningV2Config
from .layer import PrefixTuningV2Module


def init_token_ids(config, model: nn.Module, length: int) -> torch.Tensor:
    """(length,) token ids whose activations initialise a prefix: the init text, tiled, or random vocabulary."""
    if config.prefix_init == "vocab":
        return torch.randint(0, model.config.vocab_size, (length,))
    from transformers import AutoTokenizer

    source = config.tokenizer_name_or_path or config.base_model_name_or_path or model.config.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - any failure means the same fix
        raise ValueError(
            f"prefix_init='text' needs the base model's tokenizer, which could not be loaded from {source!r} "
            f"({type(error).__name__}); set tokenizer_name_or_path to a local tokenizer folder"
        ) from error
    ids = tokenizer(config.prefix_init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prefix_init_text={config.prefix_init_text!r} tokenizes to no tokens")
    return torch.tensor((ids * (length // len(ids) + 1))[:length])


class PrefixTuningV2Model(PromptTuner):
    prefix = "prefix_v2_"
    modules_attr = "prefix_v2_encoder"

    def build_prompt_module(self, config: PrefixTuningV2Config, layout: SiteLayout, model: nn.Module):
        return PrefixTuningV2Module(config, layout, hidden_size_of(model.config))

    def initialize_prompt_module(self, config: PrefixTuningV2Config, module, model: nn.Module) -> None:
        if config.prefix_init == "random" or not config.init_weights or config.inference_mode:
            return  # a loaded adapter's weights replace the initialisation anyway
        module.set_prefix(self.record_activations(init_token_ids(config, model, config.prefix_length)))

    def fold(self, adapter_name: str | None = None) -> None:
        """Fold the reparameterisation MLP into flat keys/values (identical outputs; no MLP at inference).

        The adapter saved afterwards holds the computed keys/values and loads as a flat prefix, for inference or
        for further (flat) training.
        """
        name = adapter_name or self.active_adapters[0]
        self.prompt_modules[name].fold()
        self.peft_config[name].reparameterize = False
        self.peft_config[name].folded = True
