"""PrefixTuningV2Config: prefix-tuning (Li & Liang 2021) with P-tuning v2's reach (Liu et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peft.utils import PeftType

from ..base_config import PromptConfigBase, check_positive_int


@dataclass
class PrefixTuningV2Config(PromptConfigBase):
    """Trainable keys and values at every chosen attention layer.

    The prefix enters attention as extra keys/values only: sequence length, positions and outputs are unchanged,
    so every task type works as it does without the adapter.
    """

    card_title: ClassVar[str] = "PrefixTuningV2"
    card_summary: ClassVar[str] = (
        "prefix-tuning (Li & Liang 2021) with P-tuning v2's reach: trainable keys and values in front of every chosen "
        "attention layer's own"
    )
    card_fields: ClassVar[tuple[str, ...]] = (
        "prefix_length",
        "reparameterize",
        "encoder_hidden_size",
        "prefix_init",
        "layers_to_transform",
        "encoder_prefix",
        "decoder_prefix",
        "cross_prefix",
        "folded",
    )

    peft_names: ClassVar[dict[str, str]] = PromptConfigBase.peft_names | {
        "num_virtual_tokens": "prefix_length",
        "prefix_projection": "reparameterize (True: prefix-tuning's MLP, hidden size encoder_hidden_size)",
    }
    sibling: ClassVar[str] = "InstancePromptConfig"
    sibling_names: ClassVar[dict[str, str]] = {
        "prompt_length": "prefix_length",
        "task_prefix_hidden_size": "reparameterize=True with encoder_hidden_size (prefix-tuning's MLP and its width)",
        "prompt_dropout": "prefix_dropout for dropout on the prefix keys/values (there are no instance codes here)",
    }

    prefix_length: int = field(
        default=16,
        metadata={
            "help": "Number of virtual tokens P per layer (paper: 5-10 for table-to-text, 200 for summarisation)."
        },
    )
    reparameterize: bool = field(
        default=True,
        metadata={
            "help": "True: the paper's Embedding(P, d) -> Linear(d, h) -> tanh -> Linear(h, layers*2*kv) "
            "parameterisation for stable training (fold() removes the MLP for inference). False: flat keys/values "
            "(P-tuning v2's default)."
        },
    )
    encoder_hidden_size: int = field(
        default=512,
        metadata={"help": "Hidden size h of the reparameterisation MLP (paper: 512; 800 for XSum)."},
    )
    prefix_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the prefix keys/values during training (P-tuning v2 uses 0.1)."},
    )
    folded: bool = field(
        default=False,
        metadata={
            "help": "Set by fold(): the MLP was folded into flat keys/values. Such an adapter loads and trains as a flat prefix."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType["PREFIX_TUNING_V2"]
        check_positive_int(self, "prefix_length")
        check_positive_int(self, "encoder_hidden_size")
        if not isinstance(self.prefix_dropout, (int, float)) or not 0.0 <= self.prefix_dropout < 1.0:
            raise ValueError(f"prefix_dropout must be in [0, 1) (got {self.prefix_dropout!r})")
        if not isinstance(self.reparameterize, bool):
            raise ValueError(f"reparameterize must be a bool (got {self.reparameterize!r})")
