"""The peft tuner shared by both methods: one ``BaseTuner`` that owns the prompt modules and the injection.

A method supplies a config class and a ``build_prompt_module(config, layout, model)`` that returns a
:class:`PromptModule`; everything peft expects of a tuner (adapters by name, enable/disable, unload, save/load key
mapping, trainability, generation) lives here once.

Per forward pass the tuner computes every layer's prefix once (a forward pre-hook on the transformers model, or
once per ``generate`` call), stores it, and the attention function of :mod:`peft_ipt.attention` reads its layer's
slice. Keeping the last computed prefixes until the next forward is what makes gradient checkpointing work: the
recomputation in backward reads the very tensors of the forward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.integrations import init_empty_weights
from peft.utils.other import AuxiliaryTrainingWrapper, set_additional_trainable_modules
from torch import nn
from transformers import PreTrainedModel
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.utils.import_utils import is_tracing

from .adapter_files import AdapterFileError
from .attention import (
    ADAPTED,
    ENCODER,
    SELF,
    AttentionSite,
    PrefixInjection,
    SiteLayout,
    UnsupportedModelError,
    input_embeddings,
    tokenless_towers,
)
from .base_config import vocab_size_of
from .call_state import (
    CACHE_PROMPT,
    CachePrompt,
    CallState,
    cache_argument,
    cache_of_output,
    checkpoint_units,
    drafting,
    layer_input,
)

# What a prompt module returns: kind -> (keys, values), indexed by layer slot, each slot (B|1, n_kv, P, head_dim)
# or None (no prefix there); a stacked (L, B|1, n_kv, P, head_dim) tensor or a list of per-slot tensors.
Prefixes = dict[str, tuple]
# What the attention function reads: (kind, layer) -> (keys, values) or, in mixed-adapter batches,
# (keys, values, valid) with valid (B, P) marking each row's real prefix columns.
SitePrefixes = dict[tuple[str, int], tuple]
BASE_ROW = "__base__"  # peft's name for rows that use no adapter
# a call with neither input_ids nor inputs_embeds gives an instance prompt nothing to be built from
NO_SOURCE = (
    "the instance prompt is built from the call's input_ids or inputs_embeds, and this call gave neither; pass "
    "input_ids (or inputs_embeds) to the model, as its forward takes them"
)
# Names transformers gives learned absolute-position tables (BERT/RoBERTa, BART/OPT, GPT-2, ViT-style).
POSITION_TABLES = ("position_embeddings", "embed_positions", "wpe", "position_embedding")
# The modules a user may call on their own, by role: the whole transformers model, its backbone (``base_model``:
# BertModel inside BertForSequenceClassification, LlamaModel inside LlamaForCausalLM) and, for encoder-decoder
# models, the encoder and the decoder. Each call of one of them computes its own prompts from its own inputs.
MODEL_CALL, BACKBONE_CALL, ENCODER_CALL, DECODER_CALL = "model", "backbone", "encoder", "decoder"
CONTINUOUS_BATCHING = (
    "continuous batching (generate_batch, init_continuous_batching, transformers serve) packs several requests into "
    "one row of a paged cache, where peft-ipt cannot give each its prefix or instance prompt. Use model.generate() "
    "on a padded batch instead."
)


def entry_points(model: nn.Module, tower: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, role) for every module of ``model`` that a user may call directly, outermost first; ``tower`` is the
    model whose layers take the prefixes (a multimodal model's language model, else ``model``)."""
    found = [(model, MODEL_CALL)]
    backbone = getattr(model, "base_model", model)
    if isinstance(backbone, nn.Module) and backbone is not model:
        found.append((backbone, BACKBONE_CALL))
    if tower is not model:
        found.append((tower, BACKBONE_CALL))
    if getattr(model.config, "is_encoder_decoder", False):
        found += [(model.get_encoder(), ENCODER_CALL), (model.get_decoder(), DECODER_CALL)]
    unique: dict[int, tuple[nn.Module, str]] = {}
    for module, role in found:
        unique.setdefault(id(module), (module, role))
    return list(unique.values())


class _FrozenPassDone(Exception):
    """Ends a frozen pass where the hidden states it was run for enter a layer; carries them."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def _stop_frozen_pass(module: nn.Module, args: tuple, kwargs: dict):
    raise _FrozenPassDone(kwargs.get("hidden_states", args[0] if args else None))


def in_backward() -> bool:
    """True while autograd runs a backward pass: where gradient checkpointing recomputes layers."""
    return torch._C._current_graph_task_id() != -1


def gradient_checkpointing_on(model: nn.Module) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.23's name
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)


# Models that number a sequence's positions from 1 where they number them themselves (PaliGemma's forward)
ONE_INDEXED_POSITIONS = {"PaliGemmaModel"}
# Parts of the names of a call's image, video and audio inputs (pixel_values, image_grid_thw, pixel_values_videos,
# input_features...): a model with multimodal rotary positions numbers a call carrying one itself.
MULTIMODAL_INPUT_HINTS = ("pixel", "image", "video", "grid", "audio", "feature")


def _passes_position_ids(module: nn.Module) -> bool:
    """Whether a call of ``module`` can take position_ids: its forward names them, or takes ``**kwargs`` around a
    text model whose forward names them (MOSS-Transcribe-Diarize hands its keyword arguments on to its Qwen3)."""
    parameters = inspect.signature(module.forward).parameters
    if "position_ids" in parameters:
        return True
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return False
    return any(
        inner is not module
        and isinstance(inner, PreTrainedModel)
        and inner.main_input_name == "input_ids"
        and "position_ids" in inspect.signature(inner.forward).parameters
        for inner in module.modules()
    )


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence a model with learned absolute positions can take; None for rotary/relative positions.

    A table of N rows serves N positions, less the rows in front of the first one: RoBERTa starts after its
    padding index, BART's tables carry an ``offset`` of 2.
    """
    towers = tokenless_towers(model)  # GIT's image encoder has a position per image patch
    limits = []
    for name, module in model.named_modules():
        if name.startswith(towers):
            continue
        if isinstance(module, nn.Embedding) and name.rpartition(".")[2] in POSITION_TABLES:
            offset = getattr(module, "offset", 0)
            reserved = offset if isinstance(offset, int) else 0
            if module.padding_idx is not None:
                reserved += module.padding_idx + 1
            limits.append(module.num_embeddings - reserved)
    return min(limits) if limits else None


# What the frozen pass (instance_source='frozen_model') takes from the call besides the tokens: BERT's segment ids
# (a sentence pair's second text), an encoder's explicit positions (a left-padded batch), and the layout of each token
# (LayoutLM's boxes, MarkupLM's XPath ids: (B, T, k)). Without them the frozen states were not the frozen model's on
# this input. Decoder-only models number the source themselves (_run_frozen).
# Per-token inputs besides the tokens, with what the model fills in where a call gives none (a number, or the config
# field that holds it): an input-level prompt's positions get that fill (instance_prompt/model.py).
TOKEN_INPUT_FILLS = {
    "token_type_ids": 0,
    "bbox": 0,
    "xpath_tags_seq": "tag_pad_id",
    "xpath_subs_seq": "subs_pad_id",
}
FROZEN_PASS_EXTRAS = ("position_ids", *TOKEN_INPUT_FILLS)


@dataclass
class PromptInputs:
    """What a prompt module may read of one model call. Only the source side: see :meth:`source`."""

    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    source_mask: torch.Tensor | None = (
        None  # explicit (B, T) mask of source tokens, given by the user/collator
    )
    is_encoder_decoder: bool = False
    # True when per-token labels are the model's own next tokens (a decoder-only language model trained with teacher
    # forcing); a token classifier's labels are not, and never hide their tokens from the prompt.
    teacher_forced: bool = False
    # Runs the frozen model on this call's source (PromptTuner._run_frozen(inputs, depth)); set by the tuner.
    frozen_runner: Callable[[PromptInputs, int | None], torch.Tensor] | None = field(default=None, repr=False)
    # The model's input embedding layer as it is at this call (set by the tuner): looked up per call, because
    # modules_to_save on the embeddings, set_input_embeddings or a resize replaces the module the model reads.
    embedder: nn.Module | None = field(default=None, repr=False)
    # Per-token tensors of the call that the frozen pass hands the backbone as the call did (FROZEN_PASS_EXTRAS).
    frozen_extras: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _frozen: dict = field(default_factory=dict, repr=False)

    def select(self, rows: torch.Tensor) -> PromptInputs:
        """The same call restricted to some rows of the batch (for mixed-adapter batches)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return PromptInputs(
            pick(self.input_ids),
            pick(self.attention_mask),
            pick(self.inputs_embeds),
            pick(self.labels),
            pick(self.source_mask),
            self.is_encoder_decoder,
            self.teacher_forced,
            frozen_runner=lambda _, depth: self.frozen_states(depth)[rows],
            embedder=self.embedder,
        )

    @property
    def tokens(self) -> torch.Tensor | None:
        return self.input_ids if self.input_ids is not None else self.inputs_embeds

    def present(self) -> torch.Tensor | None:
        """(B, T) bool: the call's tokens that are not padding."""
        tokens = self.tokens
        if tokens is None:
            return None
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if self.attention_mask is not None:
            mask &= self.attention_mask[:, -tokens.shape[1] :].bool()
        return mask

    def source(self) -> torch.Tensor | None:
        """(B, T) bool: the tokens an instance prompt may be built from.

        Padding never counts. For decoder-only language models trained with teacher forcing, tokens with a label
        (labels != -100) are targets and never count either; an explicit ``source_mask`` overrides that inference.
        For encoder-decoder models ``input_ids`` is the encoder input, the source by definition; a token
        classifier's labels tag its input, which stays the source whatever the labels.
        """
        mask = self.present()
        if mask is None:
            return None
        shape = mask.shape
        if self.source_mask is not None:
            mask &= self.source_mask.bool()
        elif self.labels is not None and self.teacher_forced and self.labels.shape == shape:
            mask &= self.labels == -100
        return mask

    def frozen_states(self, depth: int | None = None) -> torch.Tensor:
        """(B, T', d) hidden states of the frozen model (no prefix, no gradient) on the source tokens only: the last
        ones, or with ``depth`` those entering layer ``depth``. Computed once per call; T' <= T covers every source
        position."""
        if depth not in self._frozen:
            if self.frozen_runner is None:
                raise RuntimeError(
                    "peft_ipt: this call has no frozen model to read (a bug: please report it)"
                )
            self._frozen[depth] = self.frozen_runner(self, depth)
        return self._frozen[depth]


COMPILE_BOUNDARY = (
    "peft-ipt computes each call's prompts in Python hooks at the model's entry, which torch.compile runs eagerly "
    "between compiled graphs: compile without fullgraph=True (torch.compile(model), or generate()'s own compile "
    "with a static cache), or export with torch.export.export(..., strict=False) (its default), which traces the "
    "prompts into its graph"
)


def _eager(function: Callable) -> Callable:
    """A function torch.compile leaves to Python: with fullgraph=True, its refusal names the reason."""
    try:
        return torch.compiler.disable(function, reason=COMPILE_BOUNDARY)
    except TypeError:  # torch before 2.8 takes no reason
        return torch.compiler.disable(function)


class EntryHook:
    """The tuner's hook at an entry point: ``method(role, ...)``, run in Python (not traced) under torch.compile.

    An object rather than a closure, so that a deep copy or a pickle of the model gives the copy's hooks the copy's
    tuner."""

    def __init__(self, method: Callable, role: str):
        self.method, self.role = method, role

    @_eager
    def __call__(self, *args, **kwargs):
        return self.method(self.role, *args, **kwargs)


def _check_padding_mask(inputs: PromptInputs) -> None:
    """Refuse an attention_mask that is not (batch, length): an instance prompt reads from it which of a row's tokens
    are its input, and a custom 4-D mask does not say that."""
    mask = inputs.attention_mask
    if torch.is_tensor(mask) and mask.dim() != 2:
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}, but an instance prompt reads which tokens of each row are "
            "its input (not padding) from a (batch, length) mask, which a custom 4-D mask (an attention pattern, or "
            "a block-diagonal mask over packed sequences) does not say. Pass the (batch, length) padding mask, or "
            "use PrefixTuningV2Config, whose prefixes take 4-D masks."
        )


def _check_some_source(inputs: PromptInputs) -> None:
    """Refuse a decoder-only batch whose labels mark every token a target: the instance prompt would be built from
    nothing in training, and from the whole input at generate() (a collator for plain language modelling does this)."""
    if inputs.labels is None or inputs.source_mask is not None or not inputs.teacher_forced:
        return
    present = inputs.present()
    if present is None or inputs.labels.shape != present.shape:
        return
    if present.any() and not inputs.source().any():
        raise ValueError(
            "the instance prompt reads only source tokens, and labels != -100 marks every token of this batch a "
            "target (as DataCollatorForLanguageModeling does), so training would build each prompt from nothing while "
            "generate() builds it from the whole input. Set the labels of each example's prompt/source part to -100 "
            "(a completion-only collator), or pass source_mask=(B, T) bool naming the source tokens in the call "
            "(from a collator: Trainer drops a dataset column it does not find in the base model's forward, "
            "unless remove_unused_columns=False)."
        )


def _check_not_packed(kwargs: dict) -> None:
    """Refuse a row holding several sequences packed end to end (padding-free batching): transformers reads
    position_ids that restart inside a row, with no attention_mask, as separate sequences, each attending only to
    itself, but an instance prompt is built from its whole row, so every sequence would read the others'."""
    positions = kwargs.get("position_ids")
    if kwargs.get("attention_mask") is not None or not torch.is_tensor(positions) or positions.dim() > 2:
        return  # a mask given (transformers then reads one sequence per row), or multimodal rope's 3-D positions
    if positions.shape[-1] > 1 and bool((positions.diff(dim=-1) != 1).any()):
        raise ValueError(
            "position_ids restart inside a row and no attention_mask is given: transformers reads that as several "
            "sequences packed into one row (padding-free batching or packing: TRL's padding_free=True or "
            "packing=True, DataCollatorWithFlattening), each attending only to itself. The instance prompt is built "
            "from the whole row, so each packed sequence would get a prompt read from all of them. Pad the batch "
            "instead (DataCollatorWithPadding; in TRL padding_free=False and packing=False), or use "
            "PrefixTuningV2Config, whose prefixes serve packed rows as separate sequences."
        )


def init_token_ids(config, model: nn.Module, length: int) -> torch.Tensor:
    """(length,) token ids whose activations initialise a prefix: the init text, tiled, or random vocabulary."""
    if config.prefix_init == "vocab":
        return torch.randint(0, vocab_size_of(model.config), (length,))
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


class PromptModule(nn.Module):
    """Base of the trainable modules of one adapter: turns a model call's inputs into every layer's prefix."""

    # kind -> {layer index -> slot in the stacked prefix}; layers not listed get no prefix
    layer_slots: dict[str, dict[int, int]]
    # True if the prefix depends on the input (then generate computes it once from the source)
    instance_wise: bool = False
    # False if rows of this adapter cannot share a batch with other adapters' rows
    supports_mixed_batches: bool = True

    def prefixes(self, inputs: PromptInputs) -> Prefixes:
        raise NotImplementedError  # abstract: each method defines it

    # Length of the task-level prefix that ``prefix_init`` initialises through ``set_prefix``.
    task_prefix_length: int = 0

    def set_prefix(self, activations: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Start the task-level prefix from recorded keys/values, {(kind, layer): (key, value)}, each (1, n_kv, T, hd)."""
        raise NotImplementedError  # methods with a task-level prefix define it


def first_non_finite_submodule(module: PromptModule, inputs: PromptInputs) -> str | None:
    """Rerun ``module`` on ``inputs`` and return the path of the first submodule whose output is not finite."""
    found: list[str] = []

    def check(path: str, output) -> None:
        tensors = output if isinstance(output, (tuple, list)) else (output,)
        if not found and any(torch.is_tensor(t) and not torch.isfinite(t).all() for t in tensors):
            found.append(path)

    handles = [
        sub.register_forward_hook(lambda _m, _a, output, path=path: check(path, output))
        for path, sub in module.named_modules()
        if path
    ]
    try:
        module.prefixes(inputs)
    except Exception:  # noqa: BLE001  (a diagnosis: the error raised is the one about the NaN)
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


class PromptLayer(nn.Module, BaseTunerLayer):
    """Holds each adapter's :class:`PromptModule` under its name, so peft's tooling (``get_model_status``,
    ``disable_adapter``, state-dict selection) sees an ordinary tuner layer."""

    adapter_layer_names = ("prompt",)
    # peft's disable_input_dtype_casting() switches this on every tuner layer. Prompts cast nothing on the way in
    # (they are cast to the attention's dtype where they are used), so there is nothing for it to disable.
    cast_input_dtype_enabled = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.prompt = nn.ModuleDict()
        # The base model, referenced, never registered: where loaded prompts go (below).
        object.__setattr__(self, "_model", model)
        self.register_load_state_dict_pre_hook(self._check_loaded_weights)

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        """peft's step after loading an adapter with low_cpu_mem_usage=True. A prompt layer has no base layer (the
        tuner-layer default would look for one forever): its prompts go where the model's parameters are."""
        module = self.prompt[adapter_name] if adapter_name in self.prompt else None
        if module is None or any(p.is_meta for p in module.parameters()):
            return
        module.to(device if device is not None else _device_of(self._model))

    def _check_loaded_weights(self, module, state_dict, prefix, *args) -> None:
        """Refuse weights that do not fit an adapter exactly, before any of them is copied.

        peft loads adapters with ``strict=False`` and only warns about missing keys, so an adapter file that lacks
        a tensor would run with that tensor's random initialisation. An adapter with no key in ``state_dict`` is
        not being loaded (peft loads one adapter at a time) and is left alone.
        """
        marker = f"{prefix}prompt."
        stray = [
            k
            for k in state_dict
            if k.startswith(marker) and k[len(marker) :].split(".")[0] not in self.prompt
        ]  # keys no adapter of this model defines: peft passes keys it cannot map through unchanged
        if stray:
            raise AdapterFileError(
                f"the weights file has keys that no adapter of this method defines: {stray[:3]}. It belongs to "
                "another adapter or config; load it with the adapter_config.json it was saved with."
            )
        for name, adapter in self.prompt.items():
            start = f"{marker}{name}."
            given = {k[len(start) :]: v for k, v in state_dict.items() if k.startswith(start)}
            if not given:
                continue
            expected = adapter.state_dict()
            problems = [f"missing {k}" for k in sorted(set(expected) - set(given))]
            problems += [f"unexpected {k}" for k in sorted(set(given) - set(expected))]
            problems += [
                f"{k} has shape {tuple(given[k].shape)}, the adapter {tuple(v.shape)}"
                for k, v in expected.items()
                if k in given and given[k].shape != v.shape
            ]
            if problems:
                raise AdapterFileError(
                    f"the weights loaded into adapter {name!r} do not fit its config: {'; '.join(problems[:5])}"
                    f"{' ...' if len(problems) > 5 else ''}. The weights file belongs to another adapter or config; "
                    "load it with the adapter_config.json it was saved with."
                )


class PromptTuner(BaseTuner):
    """A ``BaseTuner`` whose adapters are :class:`PromptModule` s, injected through the attention registry."""

    prefix: str
    modules_attr: str  # name of the PromptLayer on the tuner
    target_module_mapping: dict = {}
    # The adapter's weights live on the tuner, not in the base model's modules: peft's inject_adapter_in_model, which
    # returns the bare model and drops the tuner, would leave them out of model.parameters() and its state dict (an
    # optimizer would never see them). peft refuses such tuners there and names get_peft_model as the fix.
    uses_shared_state = True

    # -- construction -------------------------------------------------------------------------------------------

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, **kwargs) -> None:
        # before peft's BaseTuner.__init__, which would add this config to the first PeftModel's peft_config dict
        if getattr(model, PrefixInjection.MARK, False):
            raise ValueError(
                f"this {type(model).__name__} already carries a peft-ipt adapter: get_peft_model was called twice on "
                "the same base model object, and the second adapter would silently replace the first one's config "
                "and prefixes in both PeftModels. Add a second adapter to the first PeftModel "
                "(model.add_adapter(name, config), then set_adapter), or give the second its own base model "
                "(from_pretrained again, or copy.deepcopy(base) before the first get_peft_model)."
            )
        super().__init__(model, peft_config, adapter_name, **kwargs)

    # peft's prompt-learning API on PeftModel (get_prompt, get_prompt_embedding_to_save) reads these through the tuner
    # from the base model, whose AttributeError would name the base model's class and not say why.
    _PROMPT_LEARNING_ATTRIBUTES = frozenset({"prompt_encoder", "prompt_tokens"})

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in self._PROMPT_LEARNING_ATTRIBUTES:
                raise
            raise AttributeError(
                f"{name!r} (used by PeftModel.get_prompt and get_prompt_embedding_to_save) belongs to peft's own "
                "prompt-learning methods, which hand their prompt to the model as past_key_values or input "
                "embeddings. A peft-ipt adapter computes its prompt inside the model's forward, so there is none to "
                "pass in: call the model or generate() with the adapter active. Its weights are in "
                "model.base_model.prompt_modules[adapter_name]."
            ) from None

    def __getstate__(self) -> dict:
        # A copy (copy.deepcopy, torch.save of the whole model) starts between calls: the last call's prompts and
        # inputs stay with the original. After a training step they carry autograd history, which deepcopy refuses
        # ("Only Tensors created explicitly by the user"); the copy's first call computes its own from its weights.
        state = super().__getstate__()
        state.update(
            _prefixes=None,
            _inputs=None,
            _instance_done=False,
            _captured={},
            _call_state=None,
            _checkpointed={},
            _recompute_state=None,
            _watched_units=set(),  # the ids of this model's layers: a copy's are others
            _owner=None,
        )
        return state

    def __setstate__(self, state: dict) -> None:
        # a whole-model pickle from an earlier peft-ipt lacks the per-call state added since
        super().__setstate__(state)
        defaults = {"_continuing": False, "_inserted": None, "_call_state": None, "_checkpointed": {}}
        defaults |= {"_owner": None, "_recompute_state": None, "_watched_units": set()}
        for name, value in defaults.items():
            if name not in self.__dict__:
                setattr(self, name, value)
        ADAPTED.add(self)

    def _pre_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        ADAPTED.add(self)
        setattr(self, self.modules_attr, PromptLayer(model))
        self._prefixes: SitePrefixes | None = None
        self._row_adapters: list[str] | None = None
        self._inputs: PromptInputs | None = None
        self._instance_done = False
        self._pinned = False
        self._continuing = False  # this call continues a cache with the cache's own prompt
        self._owner: int | None = None  # the thread of the running call (see _check_thread)
        self._inserted: torch.Tensor | None = None  # this call's input-level prompt, if it inserts one
        self._enabled = True
        self.capturing = False
        self._captured: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._calls: list[nn.Module] = []  # the entry points whose forward is running, outermost first
        self._prefixes_off = False  # the frozen pass of instance_source='frozen_model'
        self._call_state: CallState | None = None
        # Gradient checkpointing: (layer, its input's storage and shape) -> the call that ran it, for the layer's
        # recomputation in backward (_recompute_state), which may come after other calls.
        self._checkpointed: dict[tuple, tuple[weakref.ref, CallState]] = {}
        self._recompute_state: tuple[int, CallState] | None = None  # (the recomputed layer's id, its call)
        self._injection = PrefixInjection(model, self)
        self._position_limit = position_limit(self._injection.tower)
        self._causal = self._injection.causal
        # A decoder-only model with a language-modelling head takes its targets as labels (B, T); a token
        # classifier (can_generate() False) takes tags of its input.
        self._teacher_forced = (
            not getattr(model.config, "is_encoder_decoder", False)
            and callable(getattr(model, "can_generate", None))
            and model.can_generate()
        )
        # the layers gradient checkpointing recomputes: which training call ran each (see _layer_entry)
        units = checkpoint_units(model, [site[0] for site in self._injection.sites])
        self._unit_of_site = {
            (kind, layer): id(units[id(module)])
            for module, kind, layer, *_ in self._injection.sites
            if id(module) in units
        }
        self._hooks = [
            unit.register_forward_pre_hook(self._layer_entry, with_kwargs=True)
            for unit in {id(u): u for u in units.values()}.values()
        ]
        self._watched_units: set[int] = set()
        self._hooks.append(self.register_state_dict_pre_hook(PromptTuner._record_vocab_size))
        for module, role in entry_points(model, self._injection.tower):
            self._hooks.append(
                module.register_forward_pre_hook(EntryHook(self._enter, role), with_kwargs=True)
            )
            self._hooks.append(module.register_forward_hook(EntryHook(self._leave, role), always_call=True))

    def _record_vocab_size(self, prefix: str, keep_vars: bool) -> None:
        # A state dict is what save_pretrained writes: the configs saved beside it name the vocabulary the model has
        # now. resize_token_embeddings after get_peft_model (new special tokens) would otherwise leave the size it
        # had at injection, and the saved adapter would be refused on the resized base model it was trained on.
        vocab_size = vocab_size_of(self.model.config)
        for config in self.peft_config.values():
            if config.base_model_shapes is not None:  # set by check_model, vocab_size among them
                config.base_model_shapes["vocab_size"] = vocab_size

    @property
    def prompt_layer(self) -> PromptLayer:
        return getattr(self, self.modules_attr)

    @property
    def prompt_modules(self) -> nn.ModuleDict:
        return self.prompt_layer.prompt

    @property
    def layout(self) -> SiteLayout:
        return self._injection.layout

    def build_prompt_module(self, config, layout: SiteLayout, model: nn.Module) -> PromptModule:
        raise NotImplementedError  # abstract: each method defines it

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        config.check_model(model, self.layout)  # raises before anything is built
        # low_cpu_mem_usage=True (as for LoRA): the weights are left on the meta device, for an adapter file to be
        # loaded into them with load_state_dict(assign=True); get_peft_model and from_pretrained already build the
        # tuner under init_empty_weights, add_adapter and load_adapter do not.
        with init_empty_weights() if low_cpu_mem_usage else contextlib.nullcontext():
            module = self.build_prompt_module(config, self.layout, model)
        if any(p.is_meta for p in module.parameters()):
            self.prompt_modules[adapter_name] = module
        else:
            self.prompt_modules[adapter_name] = module.to(_device_of(model))
            self.initialize_prompt_module(config, module, model)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)
        if config.inference_mode:
            module.requires_grad_(False)
        set_additional_trainable_modules(
            model=model,
            peft_config=config,
            model_config=BaseTuner.get_model_config(self),
            adapter_name=adapter_name,
            activate_adapter=adapter_name in self.active_adapters,
        )

    def initialize_prompt_module(self, config, module: PromptModule, model: nn.Module) -> None:
        """Initialisation that needs the model: the task prefix from real words (``prefix_init``)."""
        if config.prefix_init == "random" or not config.init_weights or config.inference_mode:
            return  # a loaded adapter's weights replace the initialisation anyway
        length = module.task_prefix_length
        module.set_prefix(self.record_activations(init_token_ids(config, model, length)))

    def _create_and_replace(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} adds no layers to the model; it has no modules to replace")

    def _check_target_module_exists(self, *args, **kwargs):
        return False

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _check_new_adapter_config(self, config) -> None:
        pass

    # -- adapters: activate, train, enable, delete ------------------------------------------------------------

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for param in model.parameters():
            param.requires_grad_(False)
        for name, module in self.prompt_modules.items():
            trainable = name in self.active_adapters and not self.peft_config[name].inference_mode
            module.requires_grad_(trainable)
        self._keep_frozen_parts()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(
                f"peft_ipt prefixes support one active adapter at a time (got {names}); to serve several "
                "adapters in one batch, pass adapter_names=[...] per row"
            )
        unknown = [n for n in names if n not in self.prompt_modules]
        if unknown:
            raise ValueError(f"adapter {unknown[0]!r} not found; available: {list(self.prompt_modules)}")
        self.prompt_layer.set_adapter(names, inference_mode=inference_mode)
        self._keep_frozen_parts()
        self.active_adapter = names[0] if names else []
        self._prefixes = None

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        # peft's own looks for tuner layers inside the base model, where a prompt layer is not: it would return
        # having changed nothing.
        names = sorted({adapter_names} if isinstance(adapter_names, str) else set(adapter_names))
        unknown = [n for n in names if n not in self.prompt_modules]
        if unknown:
            raise ValueError(f"adapter {unknown[0]!r} not found; available: {list(self.prompt_modules)}")
        self.prompt_layer.set_requires_grad(names, requires_grad=requires_grad)
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                module.set_requires_grad(names, requires_grad=requires_grad)
        self._keep_frozen_parts()

    def _keep_frozen_parts(self) -> None:
        """Parameters a config freezes stay frozen whatever is made trainable (IPT's freeze_table)."""

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self.prompt_layer.enable_adapters(enabled)
        if enabled:
            self._injection.enable()
        else:
            self._injection.disable()  # the user's own attention implementation, bit for bit
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                module.enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; available: {list(self.peft_config)}")
        del self.peft_config[adapter_name]
        self.prompt_layer.delete_adapter(adapter_name)
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                module.delete_adapter(adapter_name, new_active_adapters=None)
        self.active_adapter = (
            self.prompt_layer.active_adapters[0] if self.prompt_layer.active_adapters else []
        )
        self._prefixes = None

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # Prompt modules are built in float32 and prefixes are cast to the attention's dtype at the point of use;
        # with autocast_adapter_dtype=False they follow the base model's dtype instead (peft's convention).
        if not autocast_adapter_dtype:
            dtype = next(p.dtype for p in self.model.parameters())
            self.prompt_modules[adapter_name].to(dtype)

    # -- transformers' own counts ----------------------------------------------------------------------------
    # PeftModel hands num_parameters and get_memory_footprint to the tuner, which would hand them on to the base
    # model: it counts its own modules only. A LoRA adapter lives inside those; a prompt adapter lives on the tuner,
    # so the base model alone answers 0 trainable parameters (as peft's own prompt methods do), and Trainer's FLOPs
    # (6 x tokens x num_parameters) leave the adapter out.

    def _adapter_tensors(self, buffers: bool = False) -> list[torch.Tensor]:
        # none of them is the base model's: the prompt layer references the model, never registers it
        return [*self.prompt_layer.parameters(), *(self.prompt_layer.buffers() if buffers else ())]

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The base model's ``num_parameters`` with the adapters' parameters counted, as LoRA's are."""
        count = self.model.num_parameters(
            only_trainable=only_trainable, exclude_embeddings=exclude_embeddings
        )
        # transformers' rule for exclude_embeddings is the weights of nn.Embedding modules; an adapter's token table
        # is a lookup too (IPT's hashed table says so with `embedding_table = True`)
        tables = {
            id(m.weight)
            for m in self.prompt_layer.modules()
            if isinstance(m, nn.Embedding) or getattr(m, "embedding_table", False)
        }
        return count + sum(
            p.numel()
            for p in self._adapter_tensors()
            if (p.requires_grad or not only_trainable) and not (exclude_embeddings and id(p) in tables)
        )

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """The base model's ``get_memory_footprint`` with the adapters' tensors counted, as LoRA's are."""
        size = self.model.get_memory_footprint(return_buffers=return_buffers)
        return size + sum(t.numel() * t.element_size() for t in self._adapter_tensors(buffers=return_buffers))

    # -- unload ---------------------------------------------------------------------------------------------

    _NOT_MERGEABLE = (
        "prefixes live in attention, not in weights: they cannot be merged into the base model. "
        "Use unload() to get the base model back, or keep the adapter (fold() removes the MLP for inference)."
    )

    def _check_merge_allowed(self) -> None:
        # merge_adapter() would otherwise find no layer to merge and return as if it had merged.
        raise ValueError(self._NOT_MERGEABLE)

    def add_weighted_adapter(self, *args, **kwargs):
        raise ValueError(
            "add_weighted_adapter combines LoRA weight deltas; a prefix adapter has none, and a weighted sum of "
            "prefixes is not the mixture of the adapters. Serve several adapters in one batch instead "
            "(`adapter_names=` per row, README: 'Serving several adapters in one batch'), or train one adapter on "
            "the combined data."
        )

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge=False, adapter_names=None
    ):
        if merge:
            raise ValueError(self._NOT_MERGEABLE)
        for handle in self._hooks:
            handle.remove()
        self._injection.remove()
        if getattr(self.model, "peft_config", None) is self.peft_config:
            del self.model.peft_config  # as peft's own tuners leave it: the base model as it was
        for name, module in list(self.model.named_modules()):
            if isinstance(module, AuxiliaryTrainingWrapper):
                # As LoRA's unload, through peft's own wrapper: a head trained beside the adapter (modules_to_save,
                # e.g. a classifier) stays under peft 0.21; peft 0.22 gives the original head back.
                parent = self.model.get_submodule(name.rpartition(".")[0]) if "." in name else self.model
                unwrapped = module.unload_and_optionally_merge_module(
                    merge=False, safe_merge=False, adapter_names=None
                )
                setattr(parent, name.rpartition(".")[2], unwrapped)
        return self.model

    # -- per-forward prefixes --------------------------------------------------------------------------------

    @staticmethod
    def by_site(module: PromptModule, prefixes: Prefixes) -> SitePrefixes:
        out = {}
        for kind, (keys, values) in prefixes.items():
            for layer, slot in module.layer_slots.get(kind, {}).items():
                if keys[slot] is not None:
                    out[(kind, layer)] = (keys[slot], values[slot])
        return out

    def _check_weights_loaded(self, names) -> None:
        for name in set(names) - {BASE_ROW}:
            module = self.prompt_modules[name] if name in self.prompt_modules else None
            if module is not None and next(module.parameters()).is_meta:
                raise RuntimeError(
                    f"adapter {name!r} has no weights yet: it was created with low_cpu_mem_usage=True, which leaves "
                    "them on the meta device until an adapter file is loaded into it (PeftModel.from_pretrained, "
                    "load_adapter, or set_peft_model_state_dict(..., low_cpu_mem_usage=True)). To train a new "
                    "adapter, create it without low_cpu_mem_usage."
                )

    def _compute_prefixes(self, inputs: PromptInputs) -> SitePrefixes | None:
        if not self._enabled or not self.active_adapters:
            return None
        if self._row_adapters is not None:
            return self._mixed_prefixes(inputs)
        module = self.prompt_modules[self.active_adapters[0]]
        return self.by_site(module, module.prefixes(inputs))

    def _mixed_prefixes(self, inputs: PromptInputs) -> SitePrefixes:
        """Each row gets its own adapter's prefix, zero-padded to the longest P and masked per row."""
        names = self._row_adapters
        if inputs.tokens is not None and inputs.tokens.shape[0] != len(names):
            raise ValueError(
                f"adapter_names has {len(names)} entries but the batch has {inputs.tokens.shape[0]} rows"
            )
        per_adapter = []
        for name in sorted(set(names) - {BASE_ROW}):
            module = self.prompt_modules[name]
            if not module.supports_mixed_batches:
                raise ValueError(
                    f"adapter {name!r} cannot share a batch with other adapters (adapter_names): its prompt "
                    "changes the sequence or is built inside the model; run its rows as a separate batch"
                )
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=self._device())
            per_adapter.append((rows, self.by_site(module, module.prefixes(inputs.select(rows)))))
        out: SitePrefixes = {}
        for site in {site for _, prefixes in per_adapter for site in prefixes}:
            entries = [(rows, prefixes[site]) for rows, prefixes in per_adapter if site in prefixes]
            sample = entries[0][1][0]
            length = max(key.shape[2] for _, (key, _) in entries)
            shape = (len(names), sample.shape[1], length, sample.shape[3])
            keys, values = sample.new_zeros(shape), sample.new_zeros(shape)
            valid = torch.zeros(len(names), length, dtype=torch.bool, device=sample.device)
            for rows, (key, value) in entries:
                p = key.shape[2]
                keys[rows, :, :p] = key.expand(len(rows), -1, -1, -1)
                values[rows, :, :p] = value.expand(len(rows), -1, -1, -1)
                valid[rows, :p] = True
            out[site] = (keys, values, valid)
        return out

    def _device(self) -> torch.device:
        return _device_of(self.model)

    def forward(self, *args, **kwargs):
        """The base model's forward. peft hands ``adapter_names`` to ``_enable_peft_forward_hooks`` and drops it, except
        where it calls the tuner directly (an MPT model's forward in ``PeftModelForCausalLM``): taken here, not
        passed to the model, whose ``**kwargs`` would have swallowed it and run every row with the active adapter."""
        kwargs = self._named_or_given(kwargs)
        if kwargs.get("adapter_names") is None:
            kwargs.pop("adapter_names", None)
            return self.model(*args, **kwargs)
        with self._enable_peft_forward_hooks(adapter_names=kwargs.pop("adapter_names")):
            return self.model(*args, **kwargs)

    def _named_or_given(self, kwargs: dict) -> dict:
        """``kwargs`` without the arguments that are None and that the model's forward does not name. peft's task
        wrappers pass every text argument, None included (``PeftModelForSeq2SeqLM``: ``input_ids=None``); a model
        that reads something else (Whisper: ``input_features``) takes them into its ``**kwargs`` and hands them on
        to its decoder, which then gets ``input_ids`` twice. Left out, they mean what None means: not given."""
        names = self.__dict__.get("_forward_names")
        if names is None:  # first call (and a model pickled by an earlier peft-ipt)
            names = self._forward_names = frozenset(inspect.signature(self.model.forward).parameters)
        return {k: v for k, v in kwargs.items() if v is not None or k in names}

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """peft calls this around forward/generate; it carries ``adapter_names`` (one adapter per row)."""
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        names = list(adapter_names)
        unknown = sorted(set(names) - set(self.prompt_modules) - {BASE_ROW})
        if unknown:
            raise ValueError(
                f"adapter_names names {unknown}, which are not loaded; available: {sorted(self.prompt_modules)} "
                f"and {BASE_ROW!r} for rows without an adapter"
            )
        self._row_adapters = names
        try:
            yield
        finally:
            self._row_adapters = None

    def _inputs_from_call(self, args: tuple, kwargs: dict, source_mask=None) -> PromptInputs:
        input_ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        extras = {name: kwargs[name] for name in FROZEN_PASS_EXTRAS if torch.is_tensor(kwargs.get(name))}
        return PromptInputs(
            input_ids=input_ids,
            attention_mask=kwargs.get("attention_mask"),
            inputs_embeds=kwargs.get("inputs_embeds"),
            labels=kwargs.get("labels"),
            source_mask=source_mask,
            is_encoder_decoder=bool(getattr(self.model.config, "is_encoder_decoder", False)),
            teacher_forced=self._teacher_forced,
            frozen_runner=self._run_frozen,
            embedder=input_embeddings(self.model),
            frozen_extras=extras,
        )

    def _enter(self, role: str, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of every entry point: the outermost call computes the prompts from its own inputs.

        A call nested in another (the model calling its backbone, the frozen pass) uses the outer call's prompts,
        and so does a decoding step of generation.
        """
        if getattr(module, "_is_replica", False):
            raise RuntimeError(
                "peft_ipt adapters cannot run under torch.nn.DataParallel (what Trainer uses when one process sees "
                "several GPUs): its replicas run in threads that would share the adapter's per-call prompts. Launch "
                "one process per GPU instead (accelerate launch or torchrun: DistributedDataParallel, which works), "
                "or make one GPU visible (CUDA_VISIBLE_DEVICES=0)."
            )
        self._check_thread()
        source_mask = kwargs.pop("source_mask", None)
        outermost = not self._calls
        if outermost and not self._pinned:
            self._owner = threading.get_ident()
        self._calls.append(module)
        if not outermost or self._pinned or self.capturing or self._prefixes_off or not self._enabled:
            return args, kwargs
        try:
            self._check_route(kwargs)
            kwargs = self._positions_from_first_tokens(module, args, kwargs)
            return self._start_entry(role, args, kwargs, source_mask)
        except BaseException:
            self._calls.pop()  # the always-called _leave then finds another module on top and does nothing
            raise

    def _check_route(self, kwargs: dict) -> None:
        """Every layer of this call gets its prefix: the attention implementation may have been switched since
        get_peft_model (followed to eager or sdpa, else refused), and continuous batching is refused."""
        self._injection.check_routed()
        if isinstance(cache_argument(kwargs), PagedAttentionCache):
            raise UnsupportedModelError(CONTINUOUS_BATCHING)

    # Continuous batching is refused before it starts (inside its loop transformers only logs an error).
    def generate_batch(self, *args, **kwargs):
        return self._continuous_batching("generate_batch")(*args, **kwargs)

    def init_continuous_batching(self, *args, **kwargs):
        return self._continuous_batching("init_continuous_batching")(*args, **kwargs)

    def continuous_batching_context_manager(self, *args, **kwargs):
        return self._continuous_batching("continuous_batching_context_manager")(*args, **kwargs)

    def _continuous_batching(self, name: str) -> Callable:
        if self._enabled and self.active_adapters:
            raise UnsupportedModelError(CONTINUOUS_BATCHING)
        return getattr(self.model, name)  # the adapter is off: the user's own model

    def _check_thread(self) -> None:
        """A call from another thread while one runs (a threaded web server sharing one model) would take or replace
        the running call's prompts: refused. LoRA is stateless there; a prompt computed per call is not."""
        busy = self._calls or self._pinned
        if busy and self._owner is not None and self._owner != threading.get_ident():
            raise RuntimeError(
                "this peft_ipt model was called from a second thread while a call (or generate()) of another thread "
                "was running: both would share the adapter's per-call prompts. Serialise the calls (a "
                "threading.Lock around model calls and generate()), or give each thread its own copy of the model "
                "(copy.deepcopy)."
            )

    def _leave(self, role: str, module: nn.Module, args: tuple, output):
        """Forward hook (always called, also on an error) of every entry point."""
        if not self._calls or self._calls[-1] is not module:
            return None
        self._calls.pop()
        if self._calls:
            return None
        if output is None:  # the call raised: nothing of it may reach the next call
            self._abandon_call()
            return None
        finished = self._finish_call(role, output)
        self._remember_prompt(role, output if finished is None else finished)
        return finished

    def _adapter_key(self) -> tuple:
        return tuple(self._row_adapters if self._row_adapters is not None else self.active_adapters)

    def _remember_prompt(self, role: str, output) -> None:
        """Give what a call returns for later calls (its cache; an encoder's outputs, which the decoder is called on)
        the instance prompt it was computed with."""
        if not self._enabled or self.capturing or self._prefixes_off or self._prefixes is None:
            return
        if not self.active_adapters or not self._instance_wise():
            return
        record = None
        for carrier in (cache_of_output(output), output if role == ENCODER_CALL else None):
            held = getattr(carrier, CACHE_PROMPT, None)
            if carrier is None or (held is not None and held.prefixes is self._prefixes):
                continue  # (a decoding step: the cache already carries this prompt)
            record = record or CachePrompt(self._adapter_key(), self._prefixes, self._inserted)
            with contextlib.suppress(AttributeError):  # a class with __slots__, or a tuple, cannot carry it
                setattr(carrier, CACHE_PROMPT, record)

    def _prompt_of_encoder_outputs(self, encoder_outputs) -> SitePrefixes:
        """A decoder call on ``encoder_outputs`` (no encoder input): the prompt of the encoder call that gave them."""
        record = getattr(encoder_outputs, CACHE_PROMPT, None)
        if record is None:
            raise ValueError(
                "this call passes encoder_outputs without the encoder's input, and they carry no instance prompt of "
                "this model (built from the encoder's input): they were not returned as they are by a call of this "
                "model's encoder (model.get_encoder()(input_ids=...)), e.g. rebuilt from their tensors. Pass the "
                "encoder's output object as it was returned, or input_ids along with encoder_outputs."
            )
        if record.adapters != self._adapter_key():
            raise ValueError(
                f"these encoder_outputs were computed with adapter(s) {list(record.adapters)}, but "
                f"{list(self._adapter_key())} are active now. Switch back with set_adapter(), or run the encoder again."
            )
        return record.prefixes

    def _prompt_of_cache(self, cache) -> CachePrompt:
        """The instance prompt to continue ``cache`` with: the one it was filled with, else a clear error."""
        record = getattr(cache, CACHE_PROMPT, None)
        if record is None:
            raise ValueError(
                f"this call continues a key/value cache of {cache.get_seq_length()} tokens that carries no instance "
                "prompt of this model: the prompt is built from the input of the call that starts a cache, and "
                "this cache was filled elsewhere (by another model, with the adapter disabled, or rebuilt from "
                "its tensors). Start the cache with a call of this model (model(input_ids=..., use_cache=True)) "
                "and pass on the cache that call returns, or call generate()."
            )
        if record.adapters != self._adapter_key():
            raise ValueError(
                f"this call continues a key/value cache filled with adapter(s) {list(record.adapters)}, but "
                f"{list(self._adapter_key())} are active now. Switch back with set_adapter() (or the same "
                "adapter_names) to continue it, or start a new cache."
            )
        return record

    def _check_generate_continues(self, kwargs: dict, inputs: PromptInputs) -> None:
        """generate() given a filled cache (a later turn of a chat): the prompt this input gets must be the cache's.

        The cache's keys and values were computed with the prompt of the call that started it; a prompt built from
        this whole input (earlier turns and the new one) differs, so decoding on from the cache would give other
        tokens than generate() without it. Same prompt (the same source, e.g. through source_mask): go on.
        """
        past = cache_argument(kwargs)
        if past is None or past.get_seq_length() == 0 or not self._instance_wise():
            return
        record = self._prompt_of_cache(past)
        if drafting(kwargs):
            # an assistant model drafting for assisted generation, a round at a time on its own cache: it drafts on
            # the cache's prompt, and the main model verifies every drafted token.
            self._prefixes, self._instance_done = record.prefixes, True
            return
        if not record.same_as(self._prefixes, self._inserted):
            raise ValueError(
                f"generate() was given a key/value cache of {past.get_seq_length()} tokens filled with another "
                "instance prompt than this input's: the prompt is built from the input's source (every token "
                "not masked out, here all earlier turns too), the cache's from the input of the call that started "
                "it. Decoding on from that cache would give other tokens than generate() without it. Pass "
                "source_mask=... marking the tokens the cache's prompt was built from (e.g. the first turn's) so "
                "both prompts are the same, or generate without the cache."
            )

    def _start_entry(self, role: str, args: tuple, kwargs: dict, source_mask) -> tuple[tuple, dict]:
        if not self.active_adapters:
            return args, kwargs
        self._check_weights_loaded(self._row_adapters or self.active_adapters)
        inputs = self._inputs_from_call(args, kwargs, source_mask)
        self._check_length(inputs, kwargs)
        if self._instance_wise():
            if role == DECODER_CALL:
                raise ValueError(
                    "the decoder of an encoder-decoder model was called on its own, but the instance prompt is built "
                    "from the encoder's input, which this call does not have. Call the whole model "
                    "(model(input_ids=..., decoder_input_ids=...)) or its encoder."
                )
            _check_padding_mask(inputs)
            _check_some_source(inputs)
            past = cache_argument(kwargs)
            if past is not None and past.get_seq_length() > 0:
                # a decoding step, or a later chunk of a prompt fed in pieces: the cache's own prompt, the one its
                # keys and values were computed with (another call may have run in between)
                record = self._prompt_of_cache(past)
                self._prefixes = record.prefixes
                self._continuing = True
                return args, self._continue_call(kwargs, record, past)
            if inputs.tokens is None and kwargs.get("encoder_outputs") is not None:
                self._prefixes = self._prompt_of_encoder_outputs(kwargs["encoder_outputs"])
                self._continuing = True
                return args, self._continue_from_encoder(kwargs)
            _check_not_packed(kwargs)  # a new prompt: from one sequence per row
        self._start_call(inputs)
        return self._transform_call(args, kwargs, inputs)

    def _finish_call(self, role: str, output):
        """Hook for methods that change the outermost call's output (input-level prompts); default: unchanged."""
        return None

    def _abandon_call(self) -> None:
        """Hook: the outermost call raised before _finish_call; forget what it set up for it."""

    @contextmanager
    def _without_prefixes(self):
        self._prefixes_off = True
        try:
            yield
        finally:
            self._prefixes_off = False

    @torch.no_grad()
    def _run_frozen(self, inputs: PromptInputs, depth: int | None = None) -> torch.Tensor:
        """The frozen model's hidden states of a call's source (instance_source='frozen_model', IDPG-style).

        One extra forward of the backbone (the encoder of encoder-decoder models) in eval mode, without gradient
        and with every prefix off. Only source tokens are visible to it (targets and padding are masked as keys).
        Decoder-only models number the source tokens 0, 1, ... whatever the padding side, and the sequence is cut
        after the last source token, so targets cost nothing. With ``depth`` the pass stops where layer ``depth``'s
        attention begins and returns the hidden states entering it: the first ``depth`` layers' cost.
        """
        source = inputs.source()
        if source is None:
            raise ValueError(NO_SOURCE)
        encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        backbone = (
            self.model.get_encoder() if encoder_decoder else getattr(self.model, "base_model", self.model)
        )
        tokens = inputs.input_ids if inputs.input_ids is not None else inputs.inputs_embeds
        accepted = inspect.signature(backbone.forward).parameters
        length = tokens.shape[1]
        call = {"attention_mask": source.long()}
        # the token axis of each: (B, T) (segments, positions) or (B, T, k) (boxes, XPath ids, TAPAS's token types)
        along = {
            name: 1 if value.dim() >= 3 and value.shape[1] == length else -1
            for name, value in inputs.frozen_extras.items()
            if name in accepted and value.dim() >= 2 and length in (value.shape[-1], value.shape[1])
        }
        call |= {name: inputs.frozen_extras[name] for name in along}
        if self._causal and not encoder_decoder:
            if not is_tracing(tokens):  # torch.export cannot trace a length read from the data: it runs uncut
                present = source.any(0).nonzero()
                end = int(present.max()) + 1 if len(present) else 1
                tokens = tokens[:, :end]
                call = {
                    name: value[..., :end] if along.get(name, -1) == -1 else value[:, :end]
                    for name, value in call.items()
                }
            if "position_ids" in accepted:
                call["position_ids"] = (call["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        call["input_ids" if inputs.input_ids is not None else "inputs_embeds"] = tokens
        stop = None
        if depth is not None:
            kind = ENCODER if encoder_decoder else SELF
            attention = next(m for m, k, layer, *_ in self._injection.sites if k == kind and layer == depth)
            stop = attention.register_forward_pre_hook(_stop_frozen_pass, with_kwargs=True)
        was_training = backbone.training
        backbone.eval()
        try:
            with self._without_prefixes():
                output = backbone(**call)[0]
        except _FrozenPassDone as done:
            output = done.hidden
        finally:
            backbone.train(was_training)
            if stop is not None:
                stop.remove()
        return output

    def _positions_added(self) -> int:
        """Positions the active adapter adds to the input (an input-level prompt); prefixes add none."""
        return 0

    def _positions_from_first_tokens(self, module: nn.Module, args: tuple, kwargs: dict) -> dict:
        """A left-padded batch on a rotary model, called without position_ids: each left-padded row's positions
        counted from its first token, as generate() counts them.

        Without a prefix such a model gives a row its logits alone whatever the padding in front of it (rotary
        positions enter attention only as differences between a query's and a key's), so transformers numbers the
        padding too. A prefix's keys carry no position, so their scores moved with the padding: a left-padded row's
        logits were off its logits alone (2e-3 on a tiny Llama), where LoRA's are not. Counted from the first token,
        the model without a prefix computes what it computed, and with one what the row computes alone. A row is
        renumbered only where its mask is one run of ones after zeros (and, continuing a cache, ones to the end);
        every other row keeps transformers' numbering. Tensor operations only, so torch.export traces it."""
        if (
            kwargs.get("position_ids") is not None
            or self._positions_added()
            or not self._rotary_text_model(module)
        ):
            return kwargs
        mask = kwargs.get("attention_mask")
        if self._numbers_its_own_positions(kwargs, mask):
            return kwargs
        tokens = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        if not torch.is_tensor(mask) or mask.dim() != 2 or tokens is None or tokens.dim() < 2:
            return kwargs
        past = cache_argument(kwargs)
        seen = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        length = tokens.shape[1]
        if mask.shape[1] != seen + length:
            return kwargs  # a mask over part of the sequence: nothing to count from
        ones = mask != 0
        rises = (ones[:, 1:] & ~ones[:, :-1]).sum(1)  # 0 -> 1 steps: one for a left-padded row
        renumber = ~ones[:, 0] & (rises == 1)
        if seen:
            renumber &= ones[:, -1] & ((~ones[:, 1:] & ones[:, :-1]).sum(1) == 0)  # its padding all in front
        origin = self._first_position()
        counted = (ones.long().cumsum(-1) - 1).clamp(min=0)[:, -length:] + origin
        numbered = torch.arange(seen, seen + length, device=mask.device).expand_as(counted) + origin
        return {**kwargs, "position_ids": torch.where(renumber[:, None], counted, numbered)}

    def _first_position(self) -> int:
        """The position a model gives a sequence's first token when it numbers the positions itself: 1 in PaliGemma
        (and the models built on it), whose positions are 1-indexed, else 0. Counted from 0 there, every row moved
        by one against the model's own numbering, which a prefix's position-free keys see: a left-padded row was
        off its logits alone (7e-3 on a tiny PaliGemma with IPT, silently)."""
        origin = self.__dict__.get("_position_origin")
        if origin is None:
            names = {type(m).__name__ for m in self.model.modules()}
            origin = 1 if names & ONE_INDEXED_POSITIONS else 0
            self.__dict__["_position_origin"] = origin
        return origin

    def _rotary_text_model(self, module: nn.Module) -> bool:
        """Whether ``module`` (an entry point) is a model with rotary positions along the text that takes
        position_ids (a decoder, or an encoder such as ModernBERT, and a model built of submodels around one, as Fuyu
        or Moshi; models with multimodal rotary positions too, where they number text alone: see
        _numbers_its_own_positions); encoder-decoder models are not read, so not those."""
        known = self.__dict__.setdefault("_rotary_entries", {})
        key = type(module)
        if key not in known:
            config = self.model.config
            known[key] = (
                not getattr(config, "is_encoder_decoder", False)
                and _passes_position_ids(module)
                and (
                    any(type(m).__name__.endswith("RotaryEmbedding") for m in self.model.modules())
                    # GPT-J and CodeGen rotate from a table of their own in older releases (transformers 5.20)
                    or any(
                        ("rope" in name or "rotary" in name) and value
                        for name, value in config.to_dict().items()
                    )
                )
            )
        return known[key]

    def _numbers_its_own_positions(self, kwargs: dict, mask) -> bool:
        """A model with multimodal rotary positions (Qwen2-VL, Qwen3-VL, GLM-4V: ``get_rope_index``) counts them from
        the attention mask itself where a call carries an image, video or audio, and in the decoding steps after one
        (its ``rope_deltas``); with text alone it numbers the padding too, as a plain rotary decoder does, so a
        left-padded text row there is renumbered like any other (before, 4e-3 off its logits alone on a tiny
        Qwen2-VL, 4e-2 on Qwen3-VL, silently)."""
        positioners = self.__dict__.get("_rope_positioners")
        if positioners is None:  # read once: this runs at every outermost call and decoding step
            positioners = [m for m in self.model.modules() if hasattr(m, "get_rope_index")]
            self.__dict__["_rope_positioners"] = positioners
        if not positioners:
            return False
        if any(
            value is not None and any(hint in name for hint in MULTIMODAL_INPUT_HINTS)
            for name, value in kwargs.items()
        ):
            return True
        past = cache_argument(kwargs)
        decoding = past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0
        return decoding and any(getattr(m, "rope_deltas", None) is not None for m in positioners)

    def _check_length(self, inputs: PromptInputs, kwargs: dict) -> None:
        """Refuse inputs longer than the model's learned positions, before the lookup fails inside torch."""
        limit = self._position_limit
        tokens = inputs.tokens
        if limit is None or tokens is None:
            return
        past = cache_argument(kwargs)
        cached = past.get_seq_length() if past is not None and not inputs.is_encoder_decoder else 0
        # a cache already holds the positions of its prefill's input-level prompt
        added = 0 if cached else self._positions_added()
        length = tokens.shape[1] + added + cached
        if length > limit:
            parts = f"{tokens.shape[1]} tokens"
            parts += f" + {added} prompt tokens (injection='input')" if added else ""
            parts += f" + {cached} cached" if cached else ""
            raise self._too_long("the input", length, parts, limit, room=limit - added, added=added)
        decoder = kwargs.get("decoder_input_ids")
        if torch.is_tensor(decoder) and decoder.shape[1] > limit:
            length = decoder.shape[1]
            raise self._too_long("the decoder input", length, f"{length} tokens", limit, room=limit, added=0)

    def _too_long(self, what: str, length: int, parts: str, limit: int, room: int, added: int) -> ValueError:
        return ValueError(
            f"{what} takes {length} positions ({parts}), but {type(self.model).__name__} has learned "
            f"positions for {limit}. Truncate it to {room} tokens, e.g. tokenizer(..., truncation=True, "
            f"max_length={room}). " + ("Prefix keys/values take no positions." if not added else "")
        )

    def _check_finite(self, prefixes: SitePrefixes | None, inputs: PromptInputs | None) -> None:
        """While training, refuse a non-finite prefix and name the module that produced it.

        One reduction and one host sync per training step. A NaN in a prefix spreads into every activation and then
        every gradient; stopping at the first one keeps the last good checkpoint the last one written.
        """
        if not prefixes or not torch.is_grad_enabled():
            return
        names = self._row_adapters if self._row_adapters is not None else self.active_adapters
        modules = {n: self.prompt_modules[n] for n in names if n in self.prompt_modules}
        if not any(m.training for m in modules.values()):
            return
        peaks = torch.stack(
            [t.detach().abs().amax().float() for entry in prefixes.values() for t in entry[:2]]
        )
        if bool(torch.isfinite(peaks).all()):
            return
        site = next(s for s, entry in prefixes.items() if not all(torch.isfinite(t).all() for t in entry[:2]))
        culprit = self._non_finite_source(modules, inputs)
        raise FloatingPointError(
            f"the prefix for {site[0]} attention, layer {site[1]}, holds NaN/inf values, produced by {culprit}. "
            "Training diverged: lower the learning rate, clip gradients (max_grad_norm), or train in fp32/bf16 "
            "rather than fp16; resume from the last checkpoint."
        )

    @torch.no_grad()
    def _non_finite_source(self, modules: dict[str, PromptModule], inputs: PromptInputs | None) -> str:
        for name, module in modules.items():
            for pname, param in module.named_parameters():
                if not torch.isfinite(param).all():
                    return (
                        f"adapter {name!r}: its parameter {pname} is non-finite (the optimizer step diverged)"
                    )
        if inputs is None:
            return "an input of the adapter (all its parameters are finite)"
        for name, module in modules.items():
            path = first_non_finite_submodule(module, inputs)
            if path is not None:
                return f"adapter {name!r}, module {path} (its parameters are finite: check its inputs)"
        return "the model's own activations fed to the adapter (its parameters and modules are finite)"

    def _instance_wise(self) -> bool:
        names = self._row_adapters if self._row_adapters is not None else self.active_adapters
        return any(self.prompt_modules[n].instance_wise for n in names if n in self.prompt_modules)

    def _start_call(self, inputs: PromptInputs) -> None:
        """A new sequence: compute every layer's prefix from its source."""
        self._inputs = inputs
        self._instance_done = False
        self._continuing = False
        self._inserted = None  # an input-level prompt, set where the call inserts it
        rng = self._rng_state() if torch.is_grad_enabled() else None
        self._call_state = CallState(inputs, rng, self._row_adapters)
        # layers of earlier calls whose input is gone (their backward has run) are forgotten
        self._checkpointed = {k: v for k, v in self._checkpointed.items() if v[0]() is not None}
        self._prefixes = self._compute_prefixes(inputs)
        self._call_state.prefixes = self._prefixes
        self._check_finite(self._prefixes, inputs)

    def _layer_entry(self, layer: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of each checkpointable layer: remember which training call ran it on which input."""
        if not self._calls or self._call_state is None or self._call_state.rng is None:
            return
        hidden = layer_input(args, kwargs)
        if hidden is not None and gradient_checkpointing_on(self.model):
            key = (id(layer), hidden.data_ptr(), tuple(hidden.shape))
            self._checkpointed[key] = (weakref.ref(hidden), self._call_state)
            if id(layer) not in self._watched_units:
                # Recomputation runs the layer's forward only, so this hook does not run then; one of its first
                # modules is called first with the layer's saved input, and finds the call from it. Registered the
                # first time the layer is checkpointed, so that calls without checkpointing pay nothing.
                self._watched_units.add(id(layer))
                for child in layer.children():
                    for module in (child, *child.children()):
                        hook = functools.partial(self._recomputed_entry, layer)
                        self._hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _recomputed_entry(self, layer: nn.Module, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of a layer's first modules: in backward, gradient checkpointing recomputes the layer
        (its forward only, so the layer's own hook does not run) and one of them gets the layer's saved input
        first; the call that ran the layer on it gives the prompt to recompute with."""
        if self._calls or not self._checkpointed or not in_backward():
            return
        hidden = layer_input(args, kwargs)
        if hidden is None:
            return
        found = self._checkpointed.get((id(layer), hidden.data_ptr(), tuple(hidden.shape)))
        if found is not None and found[0]() is not None:
            self._recompute_state = (id(layer), found[1])

    def _state_for(self, site: tuple[str, int]) -> CallState | None:
        """The call whose prompt a site's layer uses: in a recomputation in backward, the call that ran that layer
        (found by _recomputed_entry); otherwise the running call."""
        found = self._recompute_state
        if (
            found is not None
            and found[0] == self._unit_of_site.get(site)
            and not self._calls
            and in_backward()
        ):
            return found[1]
        return self._call_state

    def _rng_state(self) -> tuple:
        """The random state the prompts are computed from (their dropout), for reentrant recomputation."""
        device = self._device()
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return torch.get_rng_state(), device, cuda

    def _recompute(self, site: tuple[str, int], state: CallState) -> tuple:
        """Reentrant gradient checkpointing: one site's prefix, computed afresh inside the recomputed layer.

        The layer ran under no_grad in the forward, and in backward each recomputed layer runs a backward of its
        own; a prefix graph shared by all layers would be freed by the first of them. So each layer gets a graph of
        its own, from the call's inputs and random state: the same values, and the gradients the prompt module
        gets from every layer sum to those of a forward without checkpointing.
        """
        cpu_state, device, cuda_state = state.rng or (None, None, None)
        devices = [device] if cuda_state is not None else []
        with torch.random.fork_rng(devices=devices, enabled=cpu_state is not None):
            if cpu_state is not None:
                torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, device)
            outer, self._row_adapters = self._row_adapters, state.row_adapters
            try:
                prefixes = self._compute_prefixes(state.inputs)
            finally:
                self._row_adapters = outer
        return prefixes[site]

    def _transform_call(self, args: tuple, kwargs: dict, inputs: PromptInputs) -> tuple[tuple, dict]:
        """Hook for methods that change the call itself (input-level prompts); default: unchanged."""
        return args, kwargs

    def _continue_from_encoder(self, kwargs: dict, trim: bool = True) -> dict:
        """Hook for a decoder call on an encoder's outputs (input-level prompts put their positions back); default:
        unchanged."""
        return kwargs

    def _generation_setting(self, kwargs: dict, name: str):
        """A generate() setting as transformers resolves it: the keyword, the generation_config passed, the model's."""
        for source in (
            kwargs,
            kwargs.get("generation_config"),
            getattr(self.model, "generation_config", None),
        ):
            value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
            if value is not None:
                return value
        return None

    def _with_inferred_mask(self, args: tuple, kwargs: dict) -> dict:
        """generate() given padded input_ids and no attention_mask: transformers infers the mask from the pad token
        (input_ids != pad_token_id, unless the pad token is also end-of-sequence), after the prompt is built here.
        Infer it first, by the same rule, so that padding never enters an instance prompt."""
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        if kwargs.get("attention_mask") is not None or not torch.is_tensor(ids) or ids.dim() != 2:
            return kwargs
        pad, eos = (self._generation_setting(kwargs, name) for name in ("pad_token_id", "eos_token_id"))
        if pad is None or ids.is_floating_point():
            return kwargs
        pads = torch.as_tensor(pad, device=ids.device).flatten()
        padding = torch.isin(ids, pads)
        if not padding.any() or (
            eos is not None and torch.isin(torch.as_tensor(eos).flatten(), pads.cpu()).any()
        ):
            return kwargs
        return {**kwargs, "attention_mask": (~padding).long()}

    def _start_from_encoder_outputs(self, inputs: PromptInputs, encoder_outputs) -> None:
        """generate() on encoder outputs alone: decode with the prompt of the encoder call that returned them."""
        prefixes = self._prompt_of_encoder_outputs(encoder_outputs)
        self._inputs = inputs
        self._instance_done = True
        self._continuing = True
        self._inserted = getattr(encoder_outputs, CACHE_PROMPT).inserted
        self._call_state = CallState(inputs, None, self._row_adapters)
        self._prefixes = self._call_state.prefixes = prefixes

    def _continue_call(self, kwargs: dict, record: CachePrompt, past) -> dict:
        """Hook for methods whose prompt the cache holds as positions (input-level prompts): a call continuing it
        may need its mask widened by them; default: unchanged."""
        return kwargs

    def _generate_call(self, args: tuple, kwargs: dict, inputs: PromptInputs) -> tuple[tuple, dict]:
        """Hook to change the arguments of ``generate``; default: unchanged."""
        return args, kwargs

    def _finish_generate(self, output, args: tuple, kwargs: dict):
        return output

    def prefix_for(self, site: AttentionSite) -> tuple | None:
        if not self._enabled or self.capturing or self._prefixes_off:
            return None
        key = (site.kind, site.layer)
        entry = None if self._prefixes is None else self._prefixes.get(key)
        if not self._calls:
            if not in_backward():
                raise RuntimeError(
                    f"peft_ipt: a {site.kind}-attention module (layer {site.layer}) ran outside a call of the model, "
                    "its backbone, encoder or decoder, so its prefix would be an earlier call's. Call one of those "
                    "(e.g. model.get_base_model()(...) or .get_encoder()(...)); they compute their own prompts."
                )
            # gradient checkpointing recomputes a layer: its own call's prompt, whatever calls ran since
            state = self._state_for(key)
            if state is not None and key in state.reentrant_sites and torch.is_grad_enabled():
                return self._recompute(key, state)  # reentrant: the layer ran without grad in the forward
            if state is not None and state.prefixes is not None:
                return state.prefixes.get(key)
        elif (
            entry is not None
            and entry[0].requires_grad
            and not torch.is_grad_enabled()
            and self._call_state is not None
            and self._call_state.rng is not None
        ):
            # a training forward (begun with grad) run without grad: reentrant checkpointing, which recomputes this
            # site in backward
            self._refuse_reentrant_site(key)
            self._call_state.reentrant_sites.add(key)
        return entry

    def _refuse_reentrant_site(self, site: tuple[str, int]) -> None:
        """Raise where reentrant checkpointing of this site's layer cannot give the right gradients."""
        shared = self._injection.kv_shared_layers
        if shared and gradient_checkpointing_on(self.model):
            raise ValueError(
                f"reentrant gradient checkpointing on a model whose layers {shared} reuse earlier layers' keys "
                "and values (KV sharing, as in Gemma 3n and Gemma 4): the forward computes those keys and values "
                "without gradient, so every gradient through them is lost (LoRA's gradients there are wrong "
                "too). Use gradient_checkpointing_kwargs={'use_reentrant': False}."
            )

    def generate(self, *args, **kwargs):
        """``model.generate`` with the prompt computed once from the source, then reused at every step."""
        self._check_thread()
        self._owner = threading.get_ident()
        source_mask = kwargs.pop("source_mask", None)
        if torch.is_tensor(kwargs.get("inputs")) and "input_ids" not in kwargs and not args:
            # generate(inputs=ids): transformers' name for its main input, the token ids of a text model
            if getattr(self.model, "main_input_name", "input_ids") == "input_ids":
                kwargs["input_ids"] = kwargs.pop("inputs")
        if self._enabled and self.active_adapters and self._instance_wise():
            kwargs = self._with_inferred_mask(args, kwargs)
        inputs = self._inputs_from_call(args, kwargs, source_mask)
        if self._enabled and self.active_adapters:
            self._check_route(kwargs)
            self._check_length(inputs, {})
            if self._instance_wise():
                _check_padding_mask(inputs)
        # generate() runs without gradient: so does the prompt it decodes with (no autograd history kept after it).
        with torch.no_grad():
            self._calls.append(self.model)  # the frozen pass of the prompt computation is nested in this call
            try:
                encoded = kwargs.get("encoder_outputs")
                if inputs.tokens is None and encoded is not None and self._enabled and self._instance_wise():
                    # generating on the outputs of the encoder called alone: the prompt they were computed with
                    self._start_from_encoder_outputs(inputs, encoded)
                    kwargs = self._continue_from_encoder(kwargs, trim=False)
                else:
                    self._start_call(inputs)
            finally:
                self._calls.pop()
            if self._enabled and self.active_adapters:
                args, kwargs = self._generate_call(args, kwargs, inputs)
                self._check_generate_continues(kwargs, inputs)
        self._pinned = True
        try:
            output = self.model.generate(*args, **kwargs)
        except BaseException:
            # forget what this call set up (a later call may not set it up again), then re-raise
            self._finish_generate(None, args, kwargs)
            raise
        finally:
            self._pinned = False
        return self._finish_generate(output, args, kwargs)

    # -- activation capture (initialisation from real words) --------------------------------------------------

    def capture(self, site: AttentionSite, key: torch.Tensor, value: torch.Tensor) -> None:
        self._captured[(site.kind, site.layer)] = (key.detach(), value.detach())

    @torch.no_grad()
    def record_activations(
        self, token_ids: torch.Tensor
    ) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
        """Run the frozen model on ``token_ids`` (T,) and return every site's keys/values, each (1, n_kv, T, hd).

        For encoder-decoder models the tokens feed both the encoder and the decoder, so cross-attention records
        the encoder's keys/values of the same words.
        """
        ids = token_ids.to(next(self.model.parameters()).device)[None]
        call = {"input_ids": ids}
        if getattr(self.model.config, "is_encoder_decoder", False):
            call["decoder_input_ids"] = ids
        self.capturing, self._captured = True, {}
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(**call)
        finally:
            self.capturing = False
            self.model.train(was_training)
        captured, self._captured = self._captured, {}
        return captured

    # -- state dict: the adapter name sits right after the ModuleDict, not second to last ---------------------

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f"{cls.modules_attr}.prompt.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{cls.modules_attr}.prompt.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)
