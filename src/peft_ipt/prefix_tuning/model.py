"""PrefixTuningV2Model: the peft tuner for PrefixTuningV2Config."""

from __future__ import annotations

from torch import nn

from ..attention import SiteLayout
from ..base_config import hidden_size_of
from ..tuner import PromptTuner
from .config import PrefixTuningV2Config
from .layer import PrefixTuningV2Module


class PrefixTuningV2Model(PromptTuner):
    prefix = "prefix_v2_"
    modules_attr = "prefix_v2_encoder"

    def build_prompt_module(self, config: PrefixTuningV2Config, layout: SiteLayout, model: nn.Module):
        return PrefixTuningV2Module(config, layout, hidden_size_of(model.config))

    def fold(self, adapter_name: str | None = None) -> None:
        """Fold the reparameterisation MLP into flat keys/values (identical outputs; no MLP at inference).

        The adapter saved afterwards holds the computed keys/values and loads as a flat prefix, for inference or
        for further (flat) training.
        """
        name = adapter_name or self.active_adapters[0]
        self.prompt_modules[name].fold()
        self.peft_config[name].reparameterize = False
        self.peft_config[name].folded = True
