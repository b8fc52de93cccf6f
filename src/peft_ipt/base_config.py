"""Config fields both methods share: where prefixes go, which layers, and the base-model shapes they were built for."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from packaging.version import Version
from peft.config import PeftConfig

from ._version import __version__
from .adapter_files import (
    check_adapter_weights,
    newest_weights_file_in,
    resolve_weights,
    weights_digest,
    write_config_atomically,
)
from .attention import (
    CROSS,
    DECODER,
    ENCODER,
    SELF,
    SiteLayout,
    declared_text_config,
    text_config_of,
)
from .model_card import write_adapter_card

PREFIX_INITS = ("random", "text", "vocab")


def check_positive_int(config, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")


def layer_list(name: str, value) -> list[int] | None:
    """None, an index, or a list of indices -> a sorted list (or None); anything else is an error naming ``name``."""
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(items, (list, tuple))
        or not items
        or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in items)
    ):
        raise ValueError(
            f"{name} must be None, a layer index >= 0 or a non-empty list of them (got {value!r})"
        )
    return sorted(set(items))


def hidden_size_of(config) -> int:
    # an EncoderDecoderModel's config holds none itself: its encoder's, the width of the source an instance prompt
    # reads; Pix2Struct's neither: its text decoder's (a model that reads image patches, as Whisper reads audio)
    for source in (
        config,
        text_config_of(config),
        getattr(config, "encoder", None),
        declared_text_config(config),
    ):
        for name in ("hidden_size", "d_model", "n_embd", "dim"):
            value = getattr(source, name, None)
            if isinstance(value, int):
                return value
    raise ValueError(f"cannot read the hidden size of {type(config).__name__}")


def prompt_width_of(config) -> int:
    """The width of the hidden states an instance prompt reads: a multimodal model's language model's. Its config's
    own ``hidden_size`` may be another's (PaliGemma's is a default 2048 whatever its text model's width)."""
    return hidden_size_of(text_config_of(config))


def vocab_size_of(config) -> int | None:
    value = getattr(config, "vocab_size", None)
    return value if value is not None else getattr(text_config_of(config), "vocab_size", None)


def layout_change_hint(model, diff: dict) -> str:
    """When only the attention layout differs (hidden and vocabulary sizes agree), the base model may be the right one
    and the installed transformers the change: say so, and name the one such change known (grouped Falcon)."""
    if not diff or {"hidden_size", "vocab_size"} & diff.keys():
        return ""
    if any(k in (SELF, ENCODER, DECODER, CROSS) and a and b and a[0] != b[0] for k, (a, b) in diff.items()):
        return ""  # another number of layers: another model, not another layout
    import transformers

    hint = (
        f" If it is that model, the installed transformers ({transformers.__version__}) lays out its attention "
        "differently from the one the adapter was saved under; a prefix's per-head keys and values cannot be mapped "
        "between layouts, so load it under the transformers it was saved with, or train it again under this one."
    )
    config = text_config_of(model.config)
    if getattr(config, "model_type", None) == "falcon" and getattr(config, "new_decoder_architecture", False):
        hint += (
            f" Falcon's grouped attention is one: before transformers 5.25 it cached every query head's keys "
            f"({config.num_attention_heads} heads here), from 5.25 on its {config.num_kv_heads} key/value heads."
        )
    return hint


@dataclass
class PromptConfigBase(PeftConfig):
    # For the model card save_pretrained writes (peft_ipt.model_card): the method's name, what it does, the fields
    # that say most about an adapter of it.
    card_title: ClassVar[str] = ""
    card_summary: ClassVar[str] = ""
    card_fields: ClassVar[tuple[str, ...]] = ()
    # peft's prompt-method field names a user brings from PrefixTuningConfig / PromptTuningConfig, and what to write
    # here instead; each class adds its own length field.
    peft_names: ClassVar[dict[str, str]] = {
        "prompt_tuning_init": "prefix_init ('random', 'text' or 'vocab')",
        "prompt_tuning_init_text": "prefix_init_text (with prefix_init='text')",
        "target_modules": "layers_to_transform (a prefix goes into attention layers, not named modules)",
        "num_layers": "nothing: the layer count is read from the model",
        "num_attention_heads": "nothing: the head count is read from the model",
        "token_dim": "nothing: the hidden size is read from the model",
        "num_transformer_submodules": "nothing: the encoder/decoder stacks are read from the model "
        "(encoder_prefix / decoder_prefix / cross_prefix choose among them)",
    }
    # The other peft-ipt method's config class, its field names (a user moving a config between the two methods),
    # and what to write here.
    sibling: ClassVar[str] = ""
    sibling_names: ClassVar[dict[str, str]] = {}
    # Fields whose default changed: name -> (the peft-ipt version that changed it, the value before). An
    # adapter_config.json written before that version and silent on the field was trained at the former value.
    changed_defaults: ClassVar[dict[str, tuple[str, object]]] = {}

    def __new__(cls, *args, **kwargs):
        """Refuse peft's names (and the other method's) for our fields before the dataclass' own TypeError, which
        names no fix."""
        renamed = cls.renamed_fields()
        for name, value in kwargs.items():
            if name in renamed:
                whose, fix = renamed[name]
                raise TypeError(
                    f"{cls.__name__} has no field {name!r} (got {name}={value!r}); that is {whose} name. Use {fix}"
                )
        return super().__new__(cls)

    @classmethod
    def renamed_fields(cls) -> dict[str, tuple[str, str]]:
        """Names a user brings from peft or from the other peft-ipt method: name -> (whose name it is, what to write
        here)."""
        known = {f.name for f in fields(cls)}
        renamed = {name: ("peft's", fix) for name, fix in cls.peft_names.items()}
        renamed |= {name: (f"{cls.sibling}'s", fix) for name, fix in cls.sibling_names.items()}
        return {name: entry for name, entry in renamed.items() if name not in known}

    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={
            "help": "Layer indices that carry a prefix (as in LoRA's field of the same name); None: every layer. "
            "For encoder-decoder models the indices apply within each stack."
        },
    )
    encoder_prefix: bool | None = field(
        default=None,
        metadata={
            "help": "Encoder-decoder models: prefix on encoder self-attention. None: on (if the model has it)."
        },
    )
    decoder_prefix: bool | None = field(
        default=None,
        metadata={"help": "Encoder-decoder models: prefix on decoder self-attention. None: on."},
    )
    cross_prefix: bool | None = field(
        default=None,
        metadata={
            "help": "Encoder-decoder models: prefix on decoder cross-attention (peft's PrefixTuning has none). "
            "None: on if the model has cross-attention. True on a model without cross-attention is an error."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules besides the adapter to train and save, e.g. the task head. As in LoRA, peft adds the "
            "classifier for SEQ_CLS / TOKEN_CLS / QUESTION_ANS by itself."
        },
    )
    prefix_init: str = field(
        default="random",
        metadata={
            "help": "How the task-level prefix starts (PrefixTuningV2's prefix; InstancePrompt's with injection='hybrid'): "
            "'random'; 'text': the frozen model's own keys/values for prefix_init_text (Li & Liang's real-word "
            "initialisation); 'vocab': the keys/values of prefix-length random vocabulary tokens."
        },
    )
    prefix_init_text: str | None = field(
        default=None,
        metadata={
            "help": "Text for prefix_init='text', e.g. 'table-to-text:'. Repeated or cut to the prefix length in tokens."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer for prefix_init_text (as in peft's PromptTuningConfig). None: the base model's path."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the method's standard initialisation. False: a large random initialisation that visibly "
            "changes the output (peft's testing convention)."
        },
    )
    base_model_shapes: dict | None = field(
        default=None,
        metadata={
            "help": "Filled in by get_peft_model: hidden size, vocabulary and (layers, kv heads, head size) per "
            "attention kind of the base model. Loading onto a model with other shapes is refused."
        },
    )
    weights_sha256: str | None = field(
        default=None,
        metadata={
            "help": "Filled in by save_pretrained: the SHA-256 of the weights saved with this config. Loading refuses "
            "a folder whose weights do not match (a save that was interrupted or stopped halfway over another)."
        },
    )
    peft_ipt_version: str | None = field(
        default=None,
        metadata={"help": "The peft-ipt version that wrote this config; leave empty to auto-fill."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.peft_ipt_version is None:
            self.peft_ipt_version = __version__
        self.layers_to_transform = layer_list("layers_to_transform", self.layers_to_transform)
        if self.prefix_init not in PREFIX_INITS:
            raise ValueError(f"prefix_init must be one of {PREFIX_INITS} (got {self.prefix_init!r})")
        if self.prefix_init == "text" and not self.prefix_init_text:
            raise ValueError(
                "prefix_init='text' needs prefix_init_text, e.g. prefix_init_text='table-to-text:'"
            )
        if self.prefix_init != "text" and self.prefix_init_text:
            raise ValueError(
                f"prefix_init_text is set but prefix_init={self.prefix_init!r}; set prefix_init='text'"
            )
        for name in ("encoder_prefix", "decoder_prefix", "cross_prefix", "init_weights"):
            value = getattr(self, name)
            if not (value is None or isinstance(value, bool)) or (name == "init_weights" and value is None):
                raise ValueError(f"{name} must be a bool (got {value!r})")

    # -- saving and loading: see adapter_files.py ----------------------------------------------------------

    @classmethod
    def check_kwargs(cls, **kwargs):
        """peft's hook before a loaded config is built: refuse fields this version does not know.

        peft itself drops unknown fields with a warning; for us a field we do not know may change what the adapter
        computes, so running on without it would silently give other outputs than the ones it was trained with.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"adapter_config.json has fields {unknown} that {cls.__name__} of peft-ipt {__version__} does not "
                f"know; it was written by peft-ipt {kwargs.get('peft_ipt_version') or '(unknown version)'} "
                f"with peft {kwargs.get('peft_version') or '(unknown)'}. Upgrade: pip install -U peft-ipt peft"
            )
        return cls.with_former_defaults(kwargs)

    @classmethod
    def with_former_defaults(cls, kwargs: dict) -> dict:
        """A loaded config's fields, with the former default of each changed_defaults field it is silent on when an
        older peft-ipt wrote it: the value it was trained with, not today's default."""
        written_by = kwargs.get("peft_ipt_version")
        defaults = {f.name: f.default for f in fields(cls)}
        for name, (since, former) in cls.changed_defaults.items():
            if name in kwargs:
                continue
            if written_by is None:
                raise ValueError(
                    f"adapter_config.json names neither {name} nor the peft-ipt version that wrote it, and the "
                    f"default of {name} changed from {former!r} to {defaults[name]!r} in peft-ipt {since}. Add "
                    f'"{name}": the value the adapter was trained with (before {since}: {former!r}) to the file'
                )
            if Version(written_by) < Version(since):
                kwargs = {**kwargs, name: former}
        return kwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """peft's loader, plus the checks of the weights beside the config before peft reads them."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        hub_kwargs, _, _ = cls._split_kwargs(kwargs)
        weights = resolve_weights(str(pretrained_model_name_or_path), subfolder, hub_kwargs)
        check_adapter_weights(weights, config.weights_sha256)
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Record the checksum of the weights peft has just written beside us, then write the config atomically."""
        weights = newest_weights_file_in(save_directory)
        self.weights_sha256 = None if weights is None else weights_digest(weights)
        write_config_atomically(
            lambda folder: super(PromptConfigBase, self).save_pretrained(folder, **kwargs), save_directory
        )
        write_adapter_card(self, save_directory)  # peft adds its Hub metadata to it right after

    # -- checks against the model ---------------------------------------------------------------------------

    def selected_kinds(self, layout: SiteLayout) -> list[str]:
        """The attention kinds that get a prefix, after checking the switches against what the model has."""
        available = layout.shapes
        switches = {ENCODER: self.encoder_prefix, DECODER: self.decoder_prefix, CROSS: self.cross_prefix}
        for kind, value in switches.items():
            if value is not False and kind in layout.unserved:
                raise ValueError(f"{kind}_prefix={value}: {layout.unserved[kind]}")
            if value and kind not in available:
                kinds = ", ".join(sorted(available))
                raise ValueError(
                    f"{kind}_prefix=True, but the model has no {kind} attention (it has: {kinds}). "
                    f"Set {kind}_prefix=None for this model."
                )
        kinds = [
            k for k in (SELF, ENCODER, DECODER, CROSS) if k in available and switches.get(k) is not False
        ]
        if not kinds:
            raise ValueError("encoder_prefix, decoder_prefix and cross_prefix are all False: nothing to tune")
        return kinds

    def selected_layers(self, kind: str, layout: SiteLayout) -> list[int]:
        n_layers = layout.shapes[kind][0]
        present = layout.attention_layers(kind)
        if self.layers_to_transform is None:
            return present
        too_big = [i for i in self.layers_to_transform if i >= n_layers]
        if too_big:
            raise ValueError(
                f"layers_to_transform={self.layers_to_transform} names layer {too_big[0]}, but the model's {kind} "
                f"attention has {n_layers} layers (0..{n_layers - 1}); use indices below {n_layers}"
            )
        absent = [i for i in self.layers_to_transform if i not in present]
        if absent:
            # a hybrid model's state-space or linear-attention layer: a prefix there would never be read
            raise ValueError(
                f"layers_to_transform={self.layers_to_transform} names layer {absent[0]}, which has no {kind} "
                f"attention in this model (its {kind}-attention layers: {present}); pick from those"
            )
        return list(self.layers_to_transform)

    def model_shapes(self, model, layout: SiteLayout) -> dict:
        return {
            "hidden_size": hidden_size_of(model.config),
            "vocab_size": vocab_size_of(model.config),
            **layout.as_config(),
        }

    def check_model(self, model, layout: SiteLayout) -> None:
        """Refuse a base model this adapter was not built for; record the shapes of a new one."""
        shapes = self.model_shapes(model, layout)
        if self.base_model_shapes is not None:
            saved = {
                k: list(v) if isinstance(v, (list, tuple)) else v for k, v in self.base_model_shapes.items()
            }
            if saved != shapes:
                diff = {
                    k: (saved.get(k), shapes.get(k))
                    for k in set(saved) | set(shapes)
                    if saved.get(k) != shapes.get(k)
                }
                detail = "; ".join(f"{k}: adapter {a} vs model {b}" for k, (a, b) in sorted(diff.items()))
                raise ValueError(
                    f"this adapter was built for a base model with shapes {saved}, but the model has {shapes} "
                    f"({detail}). Load it onto the base model it was trained on "
                    f"({self.base_model_name_or_path or 'see base_model_name_or_path'})."
                    + layout_change_hint(model, diff)
                )
        self.selected_kinds(layout)
        for kind in self.selected_kinds(layout):
            self.selected_layers(kind, layout)
        self.base_model_shapes = shapes
