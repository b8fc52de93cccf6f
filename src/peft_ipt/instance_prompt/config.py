"""InstancePromptConfig: instance-wise prompt tuning (Jiang et al. 2022) and its instance-conditioned neighbours."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from peft.utils import PeftType

from ..base_config import PromptConfigBase, check_positive_int, layer_list

INSTANCE_SOURCES = ("token_table", "embeddings", "frozen_model", "hidden")
INSTANCE_ENCODERS = ("none", "mlp", "cnn", "lstm", "mixture", "attention")
INJECTIONS = ("input", "prefix", "hybrid")


@dataclass
class InstancePromptConfig(PromptConfigBase):
    """A prompt built from each input: source tokens -> instance signal -> encoder -> prompt -> injection.

    The instance signal only ever reads the source side: never target tokens under teacher forcing
    (labels != -100, or outside an explicit ``source_mask``), never padding; in ``generate()`` it is computed
    once from the input and reused at every decoding step.
    """

    card_title: ClassVar[str] = "InstancePrompt (IPT)"
    card_summary: ClassVar[str] = (
        "instance-wise prompt tuning (Jiang et al. 2022): a small trainable encoder builds each input's own prompt "
        "from that input's source tokens"
    )
    card_fields: ClassVar[tuple[str, ...]] = (
        "prompt_length",
        "injection",
        "instance_source",
        "instance_encoder",
        "instance_rank",
        "instance_phm",
        "instance_scale",
        "instance_layers",
        "task_prefix_hidden_size",
        "prefix_init",
        "layers_to_transform",
    )

    changed_defaults: ClassVar[dict[str, tuple[str, object]]] = {"instance_scale": ("0.2.0", 1.0)}
    peft_names: ClassVar[dict[str, str]] = PromptConfigBase.peft_names | {
        "num_virtual_tokens": "prompt_length",
        "prefix_projection": "task_prefix_hidden_size (the width of prefix-tuning's MLP for the task prefix; "
        "None: flat)",
    }
    sibling: ClassVar[str] = "PrefixTuningV2Config"
    sibling_names: ClassVar[dict[str, str]] = {
        "prefix_length": "prompt_length",
        "reparameterize": "task_prefix_hidden_size (the width of prefix-tuning's MLP for the task prefix; None: flat)",
        "prefix_dropout": "prompt_dropout for dropout on the instance codes (the task prefix takes no dropout here)",
    }

    prompt_length: int = field(
        default=16, metadata={"help": "Number of prompt vectors P (paper: 5-120, best near 100)."}
    )
    injection: str = field(
        default="hybrid",
        metadata={
            "help": "'input': the instance prompt as P soft tokens in front of the input (after [CLS] for encoders); "
            "'prefix': per-row key/value prefixes in instance_layers; 'hybrid': a task-level prefix at every layer "
            "plus instance_scale x the instance prompt in instance_layers (the paper's strongest variant)."
        },
    )
    instance_source: str = field(
        default="embeddings",
        metadata={
            "help": "'token_table': IPT's separate trainable re-embedding of the first instance_tokens source tokens "
            "(hashed into table_size buckets); 'embeddings': the model's frozen input embeddings; 'frozen_model': the "
            "frozen model's own last hidden states of the source, from one extra forward without gradient and with "
            "the prefixes off (IDPG-style; once per generate()); 'hidden': hidden states entering attention layer "
            "hidden_layer (LPT-style); the prompt then enters from that layer on."
        },
    )
    instance_encoder: str = field(
        default="mlp",
        metadata={
            "help": "'none' (the first P source vectors are the prompt), 'mlp' (mean-pool + bottleneck), 'cnn' (TextCNN "
            "3/4/5), 'lstm' (BiLSTM), 'mixture' (a router over encoder_hidden_size learned prompts: each input's "
            "prompt is a softmax-weighted mix of them), 'attention' (P learned queries each attend over the source vectors: "
            "each prompt vector its own weighted pool of the input; encoder_hidden_size is the query width)."
        },
    )
    instance_tokens: int = field(
        default=128,
        metadata={
            "help": "How many leading source tokens feed the instance signal (paper: the first n tokens)."
        },
    )
    instance_rank: int = field(
        default=32,
        metadata={
            "help": "Width r of the prompt codes; one Linear(r, ...) per attention kind maps them into keys/values (or embeddings)."
        },
    )
    instance_phm: int | None = field(
        default=None,
        metadata={
            "help": "IDPG's parameterised hypercomplex multiplication (PHM) layers with n = instance_phm: the "
            "instance generator's linear layers (the 'mlp' encoder's two, the 'none' encoder's projection, and the "
            "heads to keys/values or embeddings) each become a sum of n Kronecker products, about 1/n of the "
            "parameters. n must divide their widths (instance_rank, encoder_hidden_size, the model's). None: plain "
            "linear layers."
        },
    )
    encoder_hidden_size: int = field(
        default=64,
        metadata={
            "help": "Bottleneck / channel / LSTM size of the instance encoder; for 'mixture', the prompts mixed."
        },
    )
    table_size: int = field(
        default=2048, metadata={"help": "Buckets of the hashed token table (instance_source='token_table')."}
    )
    table_path: str | None = field(
        default=None,
        metadata={
            "help": "A pretrained token table (safetensors, from `peft-ipt pretrain-table`): IPT's 'pretrained' strategy."
        },
    )
    freeze_table: bool = field(
        default=False,
        metadata={
            "help": "Keep the token table fixed and train only the encoder and prompt (IPT's cost-saving option)."
        },
    )
    instance_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Layers whose prefix gets the instance prompt. None: every selected layer ('hybrid' and 'prefix'; "
            "benchmarks/ipt_ablation.py measured it above the paper's first-layer-only, [0]), from hidden_layer on "
            "for instance_source='hidden'."
        },
    )
    instance_scale: float = field(
        default=0.05,
        metadata={
            "help": "Scale of the instance part added to the task prefix in 'hybrid' (the paper's 0.05). The converged "
            "tier chose 0.05 over 1.0 on validation, at the task prefix's learning rate 1e-2: with Adam the instance "
            "generator's weights step by the learning rate whatever its output's scale, so at 1.0 it outruns the task "
            "prefix (and collapsed to one class on VitaminC at one seed). Until peft-ipt 0.2.0 the default was 1.0."
        },
    )
    hidden_layer: int | None = field(
        default=None,
        metadata={
            "help": "instance_source='hidden': the attention layer whose input hidden states feed the encoder (LPT: the middle layer). None: the middle layer."
        },
    )
    frozen_layers: int | None = field(
        default=None,
        metadata={
            "help": "instance_source='frozen_model': how many layers the frozen pass runs; the signal is then the "
            "hidden states entering layer frozen_layers (LPT's middle-layer representation, at that share of a "
            "forward's cost). None: the whole model's last hidden states (IDPG)."
        },
    )
    prompt_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the instance prompt codes during training."}
    )
    instance_drop: float = field(
        default=0.0,
        metadata={
            "help": "injection='hybrid': the chance, per training example, that its instance part is left out, so "
            "the task prefix must work alone and the instance part can only add to it (stochastic depth on the "
            "instance branch; the kept ones are scaled by 1 / (1 - instance_drop), so evaluation sees the mean). "
            "At 0.0 (the default) the two parts train together and co-adapt."
        },
    )
    task_prefix_hidden_size: int | None = field(
        default=None,
        metadata={
            "help": "injection='hybrid': reparameterise the task-level prefix as prefix-tuning does (Li & Liang: an "
            "embedding through Linear(d, h) -> tanh -> Linear(h, keys/values)) with this hidden size h. None: flat "
            "keys/values (P-tuning v2). The controlled comparison for it is PrefixTuningV2Config(reparameterize=True, "
            "encoder_hidden_size=h), the same task prefix without the instance part."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType["INSTANCE_PROMPT"]
        for name in (
            "prompt_length",
            "instance_tokens",
            "instance_rank",
            "encoder_hidden_size",
            "table_size",
        ):
            check_positive_int(self, name)
        for name, allowed in (
            ("injection", INJECTIONS),
            ("instance_source", INSTANCE_SOURCES),
            ("instance_encoder", INSTANCE_ENCODERS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed} (got {getattr(self, name)!r})")
        if not isinstance(self.prompt_dropout, (int, float)) or not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1) (got {self.prompt_dropout!r})")
        drop = self.instance_drop
        if not isinstance(drop, (int, float)) or isinstance(drop, bool) or not 0.0 <= drop < 1.0:
            raise ValueError(f"instance_drop must be in [0, 1) (got {drop!r}); 0.0 keeps every instance part")
        if drop and self.injection != "hybrid":
            raise ValueError(
                f"instance_drop={drop} leaves an example's instance part out so its task prefix works alone, which "
                f"only injection='hybrid' has (got injection={self.injection!r}); use prompt_dropout, or leave "
                "instance_drop at 0.0"
            )
        scale = self.instance_scale
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise ValueError(f"instance_scale must be a finite number (got {scale!r})")
        if self.instance_phm is not None:
            check_positive_int(self, "instance_phm")
            if self.instance_encoder not in ("mlp", "none"):
                raise ValueError(
                    f"instance_phm={self.instance_phm} factorises the generator's linear layers: the heads and the "
                    f"'mlp' or 'none' encoder's (got instance_encoder={self.instance_encoder!r}, whose convolutions, "
                    "LSTM or learned prompts it cannot); use instance_encoder='mlp' (IDPG's bottleneck), or leave "
                    "instance_phm None"
                )
        if self.hidden_layer is not None:
            if self.instance_source != "hidden":
                raise ValueError(
                    f"hidden_layer={self.hidden_layer} needs instance_source='hidden' (got {self.instance_source!r})"
                )
            if (
                not isinstance(self.hidden_layer, int)
                or isinstance(self.hidden_layer, bool)
                or self.hidden_layer < 0
            ):
                raise ValueError(f"hidden_layer must be a layer index >= 0 (got {self.hidden_layer!r})")
        if self.frozen_layers is not None:
            if self.instance_source != "frozen_model":
                raise ValueError(
                    f"frozen_layers={self.frozen_layers} needs instance_source='frozen_model' "
                    f"(got {self.instance_source!r})"
                )
            check_positive_int(self, "frozen_layers")
        if self.instance_source == "hidden" and self.injection == "input":
            raise ValueError(
                "instance_source='hidden' enters the prompt at a middle layer, so it needs injection='prefix' or "
                "'hybrid' (got injection='input')"
            )
        if (self.table_path or self.freeze_table) and self.instance_source != "token_table":
            raise ValueError(
                f"table_path / freeze_table need instance_source='token_table' (got {self.instance_source!r})"
            )
        if self.freeze_table and not self.table_path:
            raise ValueError(
                "freeze_table=True freezes a random table; give table_path (a pretrained table) too"
            )
        if self.prefix_init != "random" and self.injection != "hybrid":
            raise ValueError(
                f"prefix_init={self.prefix_init!r} initialises the task-level prefix, which only "
                f"injection='hybrid' has (got injection={self.injection!r}); use prefix_init='random'"
            )
        if self.task_prefix_hidden_size is not None:
            check_positive_int(self, "task_prefix_hidden_size")
            if self.injection != "hybrid":
                raise ValueError(
                    f"task_prefix_hidden_size={self.task_prefix_hidden_size} reparameterises the task-level prefix, "
                    f"which only injection='hybrid' has (got injection={self.injection!r}); leave it None"
                )
        if self.instance_layers is not None:
            if self.injection == "input":
                raise ValueError("instance_layers applies to injection='prefix' or 'hybrid', not 'input'")
            self.instance_layers = layer_list("instance_layers", self.instance_layers)
        if self.injection == "input" and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform does not apply to injection='input' (the prompt enters as tokens)"
            )

    def check_model(self, model, layout) -> None:
        super().check_model(model, layout)
        self.resolved_instance_layers(layout)
        if self.frozen_layers is not None:
            kind = "encoder" if "encoder" in layout.shapes else "self"
            n_layers = layout.shapes[kind][0]
            if self.frozen_layers >= n_layers:
                raise ValueError(
                    f"frozen_layers={self.frozen_layers} must be below the model's {n_layers} {kind}-attention layers "
                    f"(1..{n_layers - 1}); None runs the whole model"
                )
            present = layout.attention_layers(kind)
            if self.frozen_layers not in present:
                # the frozen pass stops where that layer's attention begins
                raise ValueError(
                    f"frozen_layers={self.frozen_layers}: layer {self.frozen_layers} of this model has no {kind} "
                    f"attention, where the frozen pass stops; pick one of its {kind}-attention layers {present}"
                )

    def hidden_source(self, layout) -> tuple[str, int]:
        """(attention kind, layer) whose input feeds instance_source='hidden'."""
        kind = "self" if "self" in layout.shapes else "encoder"
        n_layers = layout.shapes[kind][0]
        present = layout.attention_layers(kind)
        layer = present[len(present) // 2] if self.hidden_layer is None else self.hidden_layer
        if layer >= n_layers:
            raise ValueError(
                f"hidden_layer={self.hidden_layer} is out of range: the model's {kind} stack has {n_layers} layers "
                f"(0..{n_layers - 1})"
            )
        if layer not in present:
            # the hidden states are read where that layer's attention begins
            raise ValueError(
                f"hidden_layer={layer}: layer {layer} of this model has no {kind} attention to read its input at; "
                f"pick one of its {kind}-attention layers {present}"
            )
        return kind, layer

    def resolved_instance_layers(self, layout) -> dict[str, list[int]]:
        """Per selected attention kind, the layers that receive the instance prompt."""
        if self.injection == "input":
            return {}
        result = {}
        hidden = self.hidden_source(layout) if self.instance_source == "hidden" else None
        for kind in self.selected_kinds(layout):
            selected = self.selected_layers(kind, layout)
            if self.instance_layers is not None:
                missing = [i for i in self.instance_layers if i not in selected]
                if missing:
                    raise ValueError(
                        f"instance_layers={self.instance_layers} names layer {missing[0]}, which carries no prefix "
                        f"in the {kind} stack (selected layers: {selected}); pick from those"
                    )
                layers = list(self.instance_layers)
            elif hidden is not None:
                layers = [i for i in selected if kind != hidden[0] or i >= hidden[1]]
            else:
                layers = selected
            if hidden is not None and kind == hidden[0] and any(i < hidden[1] for i in layers):
                raise ValueError(
                    f"instance_layers={layers} includes layers below hidden_layer={hidden[1]}, which run before the "
                    "instance prompt exists; use layers >= hidden_layer"
                )
            if not layers and self.injection == "prefix":
                raise ValueError(
                    f"the {kind} stack's selected layers {selected} all run before hidden_layer={hidden[1]}, so with "
                    "injection='prefix' they would carry nothing; select layers >= hidden_layer in "
                    "layers_to_transform, or lower hidden_layer"
                )
            result[kind] = layers
        if not any(result.values()):
            raise ValueError(
                "no selected layer runs at or after hidden_layer: the instance prompt would reach no layer; "
                "select later layers in layers_to_transform, or lower hidden_layer"
            )
        return result
