"""The one mechanism that touches the model: per-layer key/value prefixes through transformers' attention registry.

Every attention call in a transformers model goes ``module -> ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``.
We register one function, :func:`prefix_attention_forward`, under ``"peft_ipt_<impl>"`` for the implementation the
user chose (``eager`` or ``sdpa``), with the same name in ``AttentionMaskInterface`` so the model still builds the
mask it would build for ``<impl>``. The function prepends this layer's prefix to ``key``/``value``, widens the mask
so every query sees the prefix, and calls the user's implementation. Queries, positions and outputs keep their shapes.

Which prefix a call gets is found through an :class:`AttentionSite` attached to each attention module at
install time: the kind of attention (``self`` in decoder-only/encoder-only models, ``encoder``/``decoder``/``cross``
in encoder-decoder models), its layer index, and the :class:`PrefixProvider` (the tuner) that holds the prefixes of
the current forward pass.
"""

from __future__ import annotations

import copy
import inspect
import re
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")
REGISTERED_PREFIX = "peft_ipt_"
SITE_ATTR = "_peft_ipt_site"
# Marks a module that calls the attention interface over something other than the tokens (Inkling 2's attention
# residuals mix a layer's block states with P learned queries and no mask): it takes no prefix.
NOT_TOKENS_ATTR = "_peft_ipt_not_over_tokens"

SELF, ENCODER, DECODER, CROSS = "self", "encoder", "decoder", "cross"


class PrefixProvider(Protocol):
    capturing: bool

    def prefix_for(self, site: AttentionSite) -> tuple | None:
        """Keys and values to prepend at ``site`` for the current forward, each (B or 1, n_kv_heads, P, head_dim),
        optionally followed by a (B, P) bool marking each row's real prefix columns."""

    def capture(self, site: AttentionSite, key: torch.Tensor, value: torch.Tensor) -> None:
        """Called with the model's own keys/values when the provider is recording activations (word init)."""


class ProviderRef:
    """A site's reference to its provider (the tuner): weak, so a site never keeps a removed adapter alive, yet it
    travels with its model. ``copy.deepcopy`` of the model (an EMA copy, TRL's reference model) gives sites that ask
    the copy's provider, never the original's; a pickled model takes its provider along."""

    __slots__ = ("_ref",)

    def __init__(self, provider: PrefixProvider | None):
        self._ref = weakref.ref(provider) if provider is not None else None

    def __call__(self) -> PrefixProvider | None:
        return self._ref() if self._ref is not None else None

    def __deepcopy__(self, memo: dict) -> ProviderRef:
        provider = self()
        # Within a copy of the model the provider is in ``memo`` already: this returns its copy.
        return ProviderRef(copy.deepcopy(provider, memo) if provider is not None else None)

    def __reduce__(self):
        return ProviderRef, (self(),)


@dataclass(eq=False)
class AttentionSite:
    kind: str
    layer: int
    n_kv_heads: int
    head_dim: int
    inner: Callable  # the user's attention implementation, called after the prefix is added
    provider: Callable[[], PrefixProvider | None] = field(repr=False, default=lambda: None)
    reached: bool = (
        False  # set by prefix_attention_forward: the registry path's check that the module uses it
    )
    # the registry path's first-call hooks, until they pass
    watch: list = field(default_factory=list, repr=False)
    door: object = None  # what an architecture path's door needs at call time (e.g. DeBERTa's version)
    tiles: int = (
        1  # how many times the module tiles its key/value heads before the attention function (KV_TILED_BY)
    )


class UnsupportedModelError(ValueError):
    """The model cannot take peft-ipt's prefixes."""


def widen_mask(
    mask: torch.Tensor | None,
    prefix_len: int,
    q_len: int,
    key_len: int,
    causal: bool,
    valid: torch.Tensor | None = None,
    device: torch.device | None = None,
    masked_is_true: bool = False,
    top_left: bool = False,
) -> torch.Tensor | None:
    """Prepend ``prefix_len`` visible columns to an attention mask (bool or additive float) over ``key_len`` keys.

    ``valid`` (B, P) marks, per row, which prefix columns are real (mixed-adapter batches); None: all are.
    ``masked_is_true``: a bool mask where True hides a key (MPT's convention) instead of showing it.
    ``top_left``: with no mask, a causal call of several queries means what ``is_causal=True`` means to torch's
    SDPA, query i sees keys 0..i (the registry path: transformers passes no mask exactly when that is right, e.g.
    a static cache's prefill, whose keys run past the queries into empty slots). Otherwise bottom-right: the last
    query sees the last key.
    """
    if mask is None:
        if valid is None and (not causal or q_len == 1):
            return None  # every key is visible to every query, prefix included
        # The implementation would have used is_causal=True, which the prefix columns would shift. Build the
        # causal mask over the model's own keys explicitly, and show the prefix in front of it.
        # One query: SDPA's is_causal is off, so it sees every key (bottom-right alignment gives that too).
        offset = 0 if top_left and q_len > 1 else key_len - q_len
        rows = torch.arange(q_len, device=device)[:, None] + offset
        visible = torch.arange(key_len, device=device)[None, :] <= rows
        if not causal:
            visible = torch.ones_like(visible)
        mask = (~visible if masked_is_true else visible)[None, None]  # (1, 1, q, kv)
    shown = not masked_is_true  # the bool value that lets a query see a key
    if valid is None:
        pad_shape = (*mask.shape[:-1], prefix_len)
        if mask.dtype == torch.bool:
            pad = torch.full(pad_shape, shown, dtype=torch.bool, device=mask.device)
        else:
            pad = mask.new_zeros(pad_shape)
        return torch.cat([pad, mask], dim=-1)
    batch = valid.shape[0]
    mask = mask.expand(batch, *mask.shape[1:])
    columns = valid[:, None, None, :].expand(batch, mask.shape[1], mask.shape[2], prefix_len)
    if mask.dtype != torch.bool:
        columns = torch.zeros_like(columns, dtype=mask.dtype).masked_fill(
            ~columns, torch.finfo(mask.dtype).min
        )
    elif masked_is_true:
        columns = ~columns
    return torch.cat([columns, mask], dim=-1)


def match_batch(prefix: torch.Tensor, batch: int) -> torch.Tensor:
    """(b, ...) -> (batch, ...): broadcast a task-level prefix, or repeat per-row prompts for beams/samples."""
    b = prefix.shape[0]
    if b == batch:
        return prefix
    if b == 1:
        return prefix.expand(batch, *prefix.shape[1:])
    if batch % b:
        raise RuntimeError(f"peft_ipt: prefix batch {b} does not divide attention batch {batch}")
    # generate() expands inputs with repeat_interleave (beams, num_return_sequences): do the same.
    return prefix.repeat_interleave(batch // b, dim=0)


# The tuners alive in this process: an attention module without a site, reached while none of them is running a
# call on this thread, belongs to a model without an adapter (see prefix_attention_forward).
ADAPTED: weakref.WeakSet = weakref.WeakSet()


def adapted_call_running() -> bool:
    """Whether a call of a model with a peft-ipt adapter is running on this thread."""
    thread = threading.get_ident()
    return any(tuner._calls and tuner._owner == thread for tuner in list(ADAPTED))


# Attention modules that tile their key/value heads themselves before calling the attention function, by the
# attribute that says how many times (JetMoE's mixture of attention heads repeats them top_k times with
# Tensor.repeat; other models repeat them inside the attention function, after the prefix is joined): the prefix,
# built with the config's key/value heads, is tiled alike.
KV_TILED_BY = {"JetMoeAttention": "top_k"}


def prefix_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
):
    site: AttentionSite | None = module.__dict__.get(SITE_ATTR)
    if site is None:
        if not adapted_call_running() or module.__dict__.get(NOT_TOKENS_ATTR):
            # A model built from an adapted model's config object (AutoModelForCausalLM.from_config(
            # peft_model.config), a reference model): the config names peft-ipt's attention, the model has no
            # adapter. It runs the implementation the config named before get_peft_model. So does an attention
            # over something other than the tokens.
            config = getattr(module, "config", None)
            impl = (getattr(config, "_attn_implementation", None) or "eager").removeprefix(REGISTERED_PREFIX)
            return _inner_implementation(module, impl)(module, query, key, value, attention_mask, **kwargs)
        raise RuntimeError(
            f"peft_ipt: {type(module).__name__} was not prepared for prefixes; it was probably added to the model "
            "after get_peft_model (call get_peft_model again on the final model), or it is an attention layer "
            "peft-ipt does not recognise as one (see `peft-ipt supported-models`)."
        )
    site.reached = True
    provider = site.provider()
    tiles = site.tiles
    if provider is not None and provider.capturing:
        # the model's own heads, as a prefix holds them (the tiles are copies)
        heads = key.shape[1] // tiles
        provider.capture(site, key[:, :heads], value[:, :heads])
    prefix = provider.prefix_for(site) if provider is not None else None
    if prefix is None:
        return site.inner(module, query, key, value, attention_mask, **kwargs)
    prefix_key, prefix_value, *valid = prefix  # (B|1, n_kv_heads, P, head_dim); valid (B, P) if rows differ
    batch, key_len = key.shape[0], key.shape[2]
    valid = match_batch(valid[0], batch) if valid else None
    prefix_len = prefix_key.shape[2]
    if tiles > 1:
        prefix_key = prefix_key.repeat(1, tiles, 1, 1)
        prefix_value = prefix_value.repeat(1, tiles, 1, 1)
    if (prefix_key.shape[1], prefix_key.shape[3], prefix_value.shape[3]) != (
        key.shape[1],
        key.shape[3],
        value.shape[3],
    ):
        raise RuntimeError(
            f"peft_ipt: the prefix at {site.kind} layer {site.layer} has (kv_heads, key size, value size) = "
            f"{(prefix_key.shape[1], prefix_key.shape[3], prefix_value.shape[3])} but the model's keys and values "
            f"have {(key.shape[1], key.shape[3], value.shape[3])}: the adapter was built for another model"
        )
    # (B, n_kv_heads, P + T, head_dim); the cache never holds the prefix, so positions stay the model's own.
    key = torch.cat([match_batch(prefix_key, batch).to(key.dtype), key], dim=2)
    value = torch.cat([match_batch(prefix_value, batch).to(value.dtype), value], dim=2)
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", UNMARKED_ATTENTION.get(type(module).__name__, False))
    attention_mask = widen_mask(
        attention_mask,
        prefix_len,
        query.shape[2],
        key_len,
        causal and site.kind != CROSS,
        valid,
        query.device,
        top_left=True,
    )
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5-style additive bias: no bias towards the prefix
        kwargs["position_bias"] = F.pad(position_bias, (prefix_len, 0))
    return site.inner(module, query, key, value, attention_mask, **kwargs)


def _register_implementations() -> None:
    for impl in SUPPORTED_IMPLEMENTATIONS:
        AttentionInterface.register(REGISTERED_PREFIX + impl, prefix_attention_forward)
        AttentionMaskInterface.register(REGISTERED_PREFIX + impl, ALL_MASK_ATTENTION_FUNCTIONS[impl])


_register_implementations()


def _inner_implementation(module: nn.Module, impl: str) -> Callable:
    if impl != "eager":
        return ALL_ATTENTION_FUNCTIONS[impl]
    # "eager" is not in the registry: each modeling file passes its own eager_attention_forward as the default.
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} has no eager_attention_forward in {type(module).__module__}; "
            "load the model with attn_implementation='sdpa'"
        )
    return eager


def _first_int(name: str) -> int:
    match = re.search(r"\.(\d+)(\.|$)", "." + name)
    if match is None:
        raise UnsupportedModelError(f"cannot find a layer index in the module name {name!r}")
    return int(match.group(1))


def _attr(objects: tuple, names: tuple[str, ...]) -> int | None:
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _kv_shape(module: nn.Module, config) -> tuple[int, int]:
    """(n_kv_heads, head_dim) of an attention module, from the attribute names transformers models use."""
    sources = (module, getattr(module, "config", config), config)
    n_heads = _attr(sources, ("num_heads", "num_attention_heads", "n_heads", "n_head"))
    head_dim = _attr(sources, ("head_dim", "attention_head_size", "key_value_proj_dim", "d_kv", "head_size"))
    # Multi-head latent attention (DeepSeek-V2/V3, Kimi, MiniCPM3) has keys of qk_head_dim (the config's head_dim is
    # only their rotary part); its values, and MiMo-V2's, are v_head_dim wide (_value_dim)
    head_dim = _attr((module,), ("qk_head_dim",)) or head_dim
    if n_heads is None or head_dim is None:
        raise UnsupportedModelError(f"cannot read the head count / head size of {type(module).__name__}")
    # A module's own count first: Gemma 4's global layers have fewer key/value heads than its config names (the
    # sliding layers'), which only the module's num_key_value_groups tells.
    groups = getattr(module, "num_key_value_groups", None)
    n_kv = _attr((module,), ("num_key_value_heads",))
    if n_kv is None and isinstance(groups, int) and groups > 0 and n_heads % groups == 0:
        n_kv = n_heads // groups
    n_kv = (
        n_kv or _projected_heads(module, head_dim) or _attr(sources[1:2], ("num_key_value_heads",)) or n_heads
    )
    return n_kv, head_dim


def _projected_heads(module: nn.Module, head_dim: int) -> int | None:
    """Key heads from the width of a module's key projection, where it has one: a config's num_key_value_heads may
    name another stack's (Whisper's maps it to the encoder's heads, so a decoder with more heads got prefixes of the
    encoder's shape and failed)."""
    projection = getattr(module, "k_proj", None)
    if isinstance(projection, nn.Linear) and projection.out_features % head_dim == 0:
        return projection.out_features // head_dim
    return None


def _value_dim(module: nn.Module, key_dim: int) -> int:
    """Head size of an attention module's values: its keys' except where it says otherwise (multi-head latent
    attention, MiMo-V2: v_head_dim)."""
    return _attr((module,), ("v_head_dim",)) or key_dim


# Attention classes that call the attention function without transformers' ``is_causal`` mark, with the causality
# they attend with: Doge's dynamic-mask attention (always given its mask, a causal one), and the self-attention of
# encoders that never decode: LayoutLM, MarkupLM, Splinter and the text towers of ALIGN and CLAP (before, "no
# attention modules found").
UNMARKED_ATTENTION = {
    "DogeAttention": True,
    "LayoutLMSelfAttention": False,
    "MarkupLMSelfAttention": False,
    "SplinterSelfAttention": False,
    "AlignTextSelfAttention": False,
    "ClapTextSelfAttention": False,
}
# Attention classes named otherwise: LongCat-Flash's multi-head latent attention
OTHER_ATTENTION_NAMES = ("LongcatFlashMLA",)


def _is_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    named = name.endswith("Attention") or name in OTHER_ATTENTION_NAMES
    return named and (hasattr(module, "is_causal") or name in UNMARKED_ATTENTION)


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's token embedding table, or None for a model that reads no tokens (Wav2Vec2, whose
    ``get_input_embeddings`` raises NotImplementedError)."""
    try:
        return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:
        return None


def tokenless_towers(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the submodels of a token model that read no tokens (GIT's image encoder): their attention
    takes no prefix and their position tables limit no text."""
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        return ()  # a speech or vision model: its own encoder is what it reads
    embeddings = input_embeddings(model)
    return tuple(
        name + "."
        for name, module in model.named_modules()
        if name
        and (
            (isinstance(module, PreTrainedModel) and module.main_input_name != "input_ids")
            or type(module).__name__ in OTHER_TOWERS
        )
        # a submodel that holds the token embeddings reads the tokens, whatever input its class names
        # (WhisperForCausalLM's decoder wrapper keeps Whisper's input_features)
        and not any(inner is embeddings for inner in module.modules())
    )


# towers that are plain modules, not models with a main input (Idefics' vision transformer), that read tokens of
# their own (Evolla's protein encoder), or that name no main input although they read speech (Phi-4-multimodal's
# audio encoder, inside its embedding): their attention is not the text's and takes no text prefix
OTHER_TOWERS = ("IdeficsVisionTransformer", "EvollaProteinEncoder", "Phi4MultimodalAudioModel")


# Attention modules of a language model that attend from the tokens to another input, unmarked by ``is_causal``
# (so not taken for token attention): Mllama's cross-attention layers attend to the image. They take no prefix.
OVER_ANOTHER_INPUT = {"MllamaTextCrossAttention"}


def not_over_tokens(model: nn.Module, sites) -> list[nn.Module]:
    """Modules that call the attention interface (transformers marks them with ``is_causal``), not causally, and
    whose forward can take no attention mask (no such parameter, no ``**kwargs``), so attend over something other
    than the padded tokens (Inkling 2's attention residuals), and those of OVER_ANOTHER_INPUT: they take no prefix
    and run the model's own implementation."""
    site_ids = {id(site[0]) for site in sites}
    found = []
    for module in model.modules():
        if type(module).__name__ in OVER_ANOTHER_INPUT and id(module) not in site_ids:
            found.append(module)
            continue
        if id(module) in site_ids or getattr(module, "is_causal", None) is not False:
            continue
        parameters = inspect.signature(type(module).forward).parameters
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        if "attention_mask" not in parameters and not takes_kwargs:
            found.append(module)
    return found


def outside_attention(model: nn.Module, tower: nn.Module) -> list[nn.Module]:
    """The attention modules of a multimodal model outside its language model ``tower``."""
    inside = {id(m) for m in tower.modules()}
    return [m for m in model.modules() if id(m) not in inside and _is_attention(m)]


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The innermost attention modules (those that call the attention interface), in module order, outside any
    submodel that reads no tokens."""
    towers = tokenless_towers(model)
    candidates = [
        (name, m) for name, m in model.named_modules() if _is_attention(m) and not name.startswith(towers)
    ]
    names = [name for name, _ in candidates]
    return [(n, m) for n, m in candidates if not any(o.startswith(n + ".") for o in names)]


@dataclass
class SiteLayout:
    """What a model offers: for each attention kind, its layers and their kv heads and head size."""

    # kind -> (n_layers, n_kv_heads, head_dim of the keys); where a kind's layers differ in shape (Gemma 4's global
    # layers have other heads than its sliding ones) the first layer's, and layer_shapes holds every layer's
    shapes: dict[str, tuple[int, int, int]]
    # kind -> the layer indices that have such an attention: all of 0..n_layers-1, except in hybrid models (Jamba,
    # LFM2, Qwen3-Next: state-space or linear-attention layers between them) and Mllama's cross-attention layers
    layers: dict[str, list[int]]
    # kind -> {layer: (n_kv_heads, key head size, value head size)}; the value size differs from the key's in
    # multi-head latent attention (DeepSeek: 192 and 128)
    layer_shapes: dict[str, dict[int, tuple[int, int, int]]]
    # kinds the model has but its path cannot open, with the reason and the fix (LED's encoder)
    unserved: dict[str, str] = field(default_factory=dict)

    def as_config(self) -> dict[str, list]:
        """What the adapter config records: [n_layers, n_kv, head_dim] per kind, and for a kind whose layers
        differ in shape, or whose values differ in size from its keys, also ``<kind>_layers``: [[layer, n_kv,
        key size, value size], ...] (absent otherwise, so other adapters keep the config they always had)."""
        out: dict[str, list] = {kind: list(shape) for kind, shape in self.shapes.items()}
        for kind in self.shapes:
            if not self.uniform(kind):
                out[f"{kind}_layers"] = [
                    [layer, *shape] for layer, shape in sorted(self.layer_shapes[kind].items())
                ]
        return out

    def attention_layers(self, kind: str) -> list[int]:
        return self.layers[kind]

    def uniform(self, kind: str) -> bool:
        """Every layer of ``kind`` has one shape, with keys and values of one size: what peft's PrefixTuning and
        adapters of earlier versions describe."""
        shapes = set(self.layer_shapes[kind].values())
        return len(shapes) == 1 and all(key_dim == value_dim for _, key_dim, value_dim in shapes)

    def slot_shapes(self, kind: str, layers: list[int]) -> list[tuple[int, int, int]]:
        """(n_kv_heads, key head size, value head size) of each of ``layers``, in their order: the shapes of a
        prefix's slots."""
        return [self.layer_shapes[kind][layer] for layer in layers]


def discover_sites(model: nn.Module) -> list[tuple[nn.Module, str, int, int, int]]:
    """(module, kind, layer, n_kv_heads, head_dim) for every attention module of a transformers model."""
    config = model.config
    modules = find_attention_modules(model)
    if not modules:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({config.model_type}): no attention modules found; peft-ipt supports "
            "transformers models whose attention goes through transformers.AttentionInterface"
        )
    encoder = model.get_encoder() if getattr(config, "is_encoder_decoder", False) else None
    encoder_ids = {id(m) for m in encoder.modules()} if encoder is not None else set()
    sites, seen_decoder_layers = [], set()
    for name, module in modules:
        layer = _first_int(name)
        if encoder is None:
            kind = CROSS if getattr(module, "is_cross_attention", False) else SELF
        elif id(module) in encoder_ids:
            kind = ENCODER
        else:
            # In every encoder-decoder layer the self-attention comes before the cross-attention.
            kind = CROSS if layer in seen_decoder_layers else DECODER
            seen_decoder_layers.add(layer)
        sites.append((module, kind, layer, *_kv_shape(module, config)))
    return _own_layer_indices(sites)


def _own_layer_indices(sites: list[tuple]) -> list[tuple]:
    """Where one layer holds several attention modules of a kind, each with a cache slot of its own (LongCat-Flash's
    two per decoder layer, ``layer_idx`` 2i and 2i + 1), number that kind's sites by those slots, so each takes a
    prefix of its own. Everywhere else a site keeps the index in its module name: a decoder's cross-attention beside
    its self-attention at one ``layer_idx`` (BART's or BERT's as a causal LM, where it runs only given encoder states)
    shares its layer's prefix, as it always has."""
    renumbered = set()
    for kind in {site[1] for site in sites}:
        of_kind = [site for site in sites if site[1] == kind]
        layers = [site[2] for site in of_kind]
        own = [getattr(site[0], "layer_idx", None) for site in of_kind]
        colliding = len(set(layers)) != len(layers)
        distinct = all(isinstance(index, int) for index in own) and len(set(own)) == len(own)
        if colliding and distinct:
            renumbered.add(kind)
    return [
        (site[0], site[1], site[0].layer_idx, *site[3:]) if site[1] in renumbered else site for site in sites
    ]


def halves_off_the_registry(model: nn.Module) -> dict[str, str]:
    """A composite encoder-decoder (EncoderDecoderModel) routes its attention through the registry, but a half
    built from a model type off it (BigBird, RemBERT, RoFormer...) would silently take no prefix: the kinds of such a
    half, each with the reason and the fix."""
    config = model.config
    if not getattr(config, "is_encoder_decoder", False) or not hasattr(model, "get_decoder"):
        return {}
    halves = {ENCODER: (model.get_encoder(), (ENCODER,)), DECODER: (model.get_decoder(), (DECODER, CROSS))}
    towers = tokenless_towers(model)
    names = {id(module): name for name, module in model.named_modules()}
    found = {}
    for half, (module, kinds) in halves.items():
        if (
            module is model
            or not isinstance(module, PreTrainedModel)
            or module._can_set_attn_implementation()
        ):
            continue
        if towers and names.get(id(module), "").startswith(towers):
            continue  # an image or speech encoder: it takes no prefix anyway
        reason = (
            f"{type(model).__name__}'s {half} is {type(module).__name__} ({module.config.model_type}), whose "
            "attention does not go through transformers' AttentionInterface, so inside this composite model it "
            f"cannot take a prefix (peft-ipt's own path for it serves it only as a model of its own). Set "
            f"{half}_prefix=False{' and cross_prefix=False' if half == DECODER else ''} to tune the other half "
            f"only, or build the {half} from a model type on the registry (BERT, RoBERTa, GPT-2...)."
        )
        found.update(dict.fromkeys(kinds, reason))
    encoder = halves[ENCODER][0]
    own = next((m for m in encoder.modules() if type(m).__name__ in ENCODER_ATTENTION_OFF_THE_REGISTRY), None)
    if own is not None and ENCODER not in found:
        found[ENCODER] = (
            f"{type(model).__name__}'s encoder attends through {type(own).__name__} "
            f"({ENCODER_ATTENTION_OFF_THE_REGISTRY[type(own).__name__]}), outside transformers' AttentionInterface, "
            "so it cannot take a prefix; set encoder_prefix=False to tune the decoder and cross-attention only."
        )
    return found


# encoder attention of models whose decoder goes through the registry but whose encoder does not
ENCODER_ATTENTION_OFF_THE_REGISTRY = {
    "BigBirdPegasusEncoderAttention": "block-sparse attention, or BigBird's full attention in original_full",
}


def layout_of(sites) -> SiteLayout:
    shapes: dict[str, tuple[int, int, int]] = {}
    layer_shapes: dict[str, dict[int, tuple[int, int, int]]] = {}
    for module, kind, layer, n_kv, head_dim in sites:
        shape = (n_kv, head_dim, _value_dim(module, head_dim))
        per_layer = layer_shapes.setdefault(kind, {})
        if per_layer.get(layer, shape) != shape:
            raise UnsupportedModelError(
                f"{kind} layer {layer} has two attention modules of different shapes ({per_layer[layer]} and "
                f"{shape} key/value heads, key size, value size); peft-ipt gives each layer one prefix"
            )
        per_layer[layer] = shape
    for kind, per_layer in layer_shapes.items():
        n_kv, head_dim, _ = per_layer[min(per_layer)]
        shapes[kind] = (max(per_layer) + 1, n_kv, head_dim)
    return SiteLayout(shapes, {kind: sorted(found) for kind, found in layer_shapes.items()}, layer_shapes)


def check_transformers_model(model: nn.Module) -> str:
    """Raise a clear error unless ``model`` is a transformers model with a supported attention implementation;
    return that implementation (``eager`` or ``sdpa``)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers PreTrainedModel; peft-ipt needs one"
        )
    impl = config._attn_implementation or "eager"
    base_impl = impl.removeprefix(REGISTERED_PREFIX)
    if base_impl not in SUPPORTED_IMPLEMENTATIONS:
        if "flex" in base_impl:
            why = "flex_attention's block mask is built over the model's own keys, with no room for prefix keys."
        elif "paged" in base_impl:
            why = "paged attention serves continuous batching, which keeps no per-row prefix."
        else:
            why = "flash-attention kernels take no per-layer key/value prefix with the padding layout transformers uses."
        raise UnsupportedModelError(
            f"attn_implementation={impl!r} is not supported by peft-ipt's prefixes (supported: "
            f"{', '.join(SUPPORTED_IMPLEMENTATIONS)}); load the model with attn_implementation='sdpa'. {why}"
        )
    return base_impl


def check_no_upcast(sites, base_impl: str) -> None:
    """GPT-2 upcasts its attention scores only under the implementation name "eager" (``reorder_and_upcast_attn``):
    under peft-ipt's name it would silently attend without the upcast."""
    if base_impl == "eager" and any(getattr(m, "reorder_and_upcast_attn", False) for m, *_ in sites):
        raise UnsupportedModelError(
            "reorder_and_upcast_attn=True with attn_implementation='eager': GPT-2 upcasts its attention scores "
            "only in its own eager code, which a prefix cannot go through, so the adapted model would attend "
            "without the upcast. Load the model with attn_implementation='sdpa' (which never upcasts, with or "
            "without an adapter) or with reorder_and_upcast_attn=False."
        )


class AttentionPath:
    """How prefixes enter one family of models: where the attention sites are, and the door into each.

    The registry path below serves every model whose attention goes through transformers' AttentionInterface; the
    architectures whose attention does not have one small path each in :mod:`peft_ipt.architectures`. Every path
    asks the same :class:`PrefixProvider` for a site's prefix, so the methods never learn which path runs.
    """

    name = "registry"
    unserved: dict[str, str] = {}

    def sites(self, model: nn.Module) -> list[tuple[nn.Module, str, int, int, int]]:
        self.unserved = halves_off_the_registry(model)
        if self.unserved and not find_attention_modules(model):
            raise UnsupportedModelError(" ".join(dict.fromkeys(self.unserved.values())))
        sites = discover_sites(model)
        if getattr(model.config, "is_encoder_decoder", False) and ENCODER not in self.unserved:
            if not any(kind == ENCODER for _, kind, *_ in sites) and any(
                True for _ in model.get_encoder().parameters()
            ):
                # an encoder whose attention the registry never reaches: it would run without a prefix, silently
                self.unserved = {
                    **self.unserved,
                    ENCODER: f"{type(model).__name__}'s encoder has no attention module on transformers' "
                    "AttentionInterface, so it cannot take a prefix; set encoder_prefix=False to tune the decoder "
                    "and cross-attention only.",
                }
        return sites

    def install(self, model: nn.Module, sites, provider_ref) -> None:
        base_impl = check_transformers_model(model)
        check_no_upcast(sites, base_impl)
        for module, kind, layer, n_kv, head_dim in sites:
            site = AttentionSite(kind, layer, n_kv, head_dim, _inner_implementation(module, base_impl))
            tiled_by = KV_TILED_BY.get(type(module).__name__)
            site.tiles = getattr(module, tiled_by) if tiled_by else 1
            site.provider = provider_ref
            module.__dict__[SITE_ATTR] = site  # a plain attribute: not a submodule, not in the state dict
            # Refuse a module that computes attention itself although its modeling file uses the registry
            # elsewhere (transformers' own test for the registry reads the file, not the module): its prefix would
            # be ignored. The first call of each module with the adapter on is watched: it must reach
            # prefix_attention_forward. The hooks find their site through the module, so a copied model's hooks
            # watch the copy's sites.
            site.watch = [
                module.register_forward_pre_hook(_watch_before),
                module.register_forward_hook(_watch_after),
            ]
        self._base_impl = base_impl
        self._sites = sites
        self._not_over_tokens = not_over_tokens(model, sites)
        for module in self._not_over_tokens:
            module.__dict__[NOT_TOKENS_ATTR] = True
        self.enable(model)

    def enable(self, model: nn.Module) -> None:
        # The user may have chosen another implementation while the adapter was off: eager or sdpa, the prefixes
        # go through it; anything else stays set, so the next call refuses it (check_routed).
        base = (model.config._attn_implementation or "eager").removeprefix(REGISTERED_PREFIX)
        if base in SUPPORTED_IMPLEMENTATIONS:
            self._route(model, base)

    def disable(self, model: nn.Module) -> None:
        model.set_attn_implementation(self._base_impl)

    def check_routed(self, model: nn.Module) -> None:
        """Before each call with the adapter on: the model's attention still goes through the prefixes.

        ``model.set_attn_implementation(...)`` after ``get_peft_model`` replaces the name the attention modules look
        up, and every layer would silently run without its prefix. Switched to eager or sdpa, the prefixes follow;
        to an implementation that cannot take them, the call is refused.
        """
        impl = model.config._attn_implementation or "eager"
        if impl == REGISTERED_PREFIX + self._base_impl:
            return
        base = impl.removeprefix(REGISTERED_PREFIX)
        if base not in SUPPORTED_IMPLEMENTATIONS:
            raise UnsupportedModelError(
                f"the model's attn_implementation was changed to {impl!r} after get_peft_model (e.g. by "
                "model.set_attn_implementation), which peft-ipt's prefixes cannot go through: its layers would run "
                f"without them. Set it back with model.set_attn_implementation('{self._base_impl}') (supported: "
                f"{', '.join(SUPPORTED_IMPLEMENTATIONS)})."
            )
        check_no_upcast(self._sites, base)
        self._route(model, base)

    def _route(self, model: nn.Module, base_impl: str) -> None:
        """Prefixes in front of ``base_impl`` (eager or sdpa) at every site."""
        if base_impl != self._base_impl:
            for module, *_ in self._sites:
                module.__dict__[SITE_ATTR].inner = _inner_implementation(module, base_impl)
            self._base_impl = base_impl
        model.set_attn_implementation(REGISTERED_PREFIX + base_impl)

    def remove(self, model: nn.Module, sites) -> None:
        self.disable(model)
        for module in getattr(self, "_not_over_tokens", ()):
            module.__dict__.pop(NOT_TOKENS_ATTR, None)
        for module, *_ in sites:
            site = module.__dict__.pop(SITE_ATTR, None)
            for handle in site.watch if site is not None else ():
                handle.remove()


def _watch_before(module: nn.Module, _args) -> None:
    module.__dict__[SITE_ATTR].reached = False


def _watch_after(module: nn.Module, _args, _output) -> None:
    site = module.__dict__[SITE_ATTR]
    provider = site.provider()
    if provider is None or not getattr(provider, "_enabled", True):
        return  # the user's own attention runs while the adapter is off
    if not site.reached:
        raise UnsupportedModelError(
            f"{type(module).__name__} (layer {site.layer}) computes its attention itself in this transformers "
            "version instead of calling transformers.AttentionInterface, so peft-ipt's prefix would be "
            "ignored. Upgrade transformers, or see `peft-ipt supported-models`."
        )
    for handle in site.watch:
        handle.remove()
    site.watch = []


def attention_path_for(model: nn.Module) -> AttentionPath:
    """The path prefixes take into ``model``: the attention registry where transformers routes the model's
    attention through it, else the architecture's own path; anything else is refused, naming what is supported."""
    check_transformers_model(model)
    from .architectures import ARCHITECTURE_PATHS, supported_model_types

    if model._can_set_attn_implementation():
        return AttentionPath()
    for path in ARCHITECTURE_PATHS:
        if path.handles(model):
            return path.new()
    config = model.config
    raise UnsupportedModelError(
        f"{type(model).__name__} ({config.model_type}) does not route attention through "
        "transformers.AttentionInterface, and peft-ipt has no path of its own for it. Supported without the "
        f"registry: {', '.join(supported_model_types())}; with it, every model whose attention transformers routes "
        "through AttentionInterface (`peft-ipt supported-models` lists the model types of this transformers)."
    )


def text_config_of(config):
    """The config of the language model: a multimodal model's text config (Llava, Gemma 3, Qwen2-VL; BLIP-2 on
    Flan-T5 and Florence-2, whose language model is itself an encoder-decoder), else itself. An encoder-decoder
    whose text config is one half of it (EncoderDecoderModel's decoder, an audio model's text decoder) is its own
    language model: its encoder takes prefixes too."""
    text = declared_text_config(config)
    if text is None:
        return config
    if getattr(config, "is_encoder_decoder", False):
        whole = text is not config and text.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
        return text if whole else config
    return text


def declared_text_config(config):
    """``config.get_text_config()``, or None where it has none or several (MusicGen's text encoder and decoder)."""
    try:
        return config.get_text_config() if hasattr(config, "get_text_config") else None
    except ValueError:
        return None


def text_tower(model: nn.Module) -> nn.Module:
    """The model whose attention takes the prefixes: a multimodal model's language model (Llava, Gemma 3, Qwen2-VL:
    the submodel built from its text config; its vision or audio towers take none), else the model itself."""
    config = getattr(model, "config", None)
    text = text_config_of(config) if config is not None else None
    if text is config:
        return model
    for module in model.modules():
        if (
            module is not model
            and getattr(module, "config", None) is text
            and hasattr(module, "set_attn_implementation")
        ):
            return module
    raise UnsupportedModelError(
        f"{type(model).__name__} ({config.model_type}) has a text config but no submodel built from it, so peft-ipt "
        "cannot tell which attention layers belong to its language model"
    )


class PrefixInjection:
    """Installs the prefix attention on one model and restores the user's implementation on removal.

    In a multimodal model only the language model (``tower``) is touched: its attention layers take the prefixes,
    its attention implementation is the one switched; the vision and audio towers run as they are.
    """

    MARK = "_peft_ipt_injected"  # set on a model while an injection is installed in it

    def __init__(self, model: nn.Module, provider: PrefixProvider):
        self.model = model
        self.tower = text_tower(model)
        self.multimodal = self.tower is not model
        self.path = attention_path_for(self.tower)
        self.sites = self.path.sites(self.tower)
        self.layout = layout_of(self.sites)
        self.layout.unserved = dict(getattr(self.path, "unserved", {}))
        # Layers that reuse an earlier layer's keys/values (Gemma 3n / 4 KV sharing): reentrant checkpointing
        # computes those keys/values without gradient, so the later layers' gradients through them are lost.
        self.kv_shared_layers = sorted(
            {layer for module, _, layer, *_ in self.sites if getattr(module, "is_kv_shared_layer", False)}
        )
        # Decoder-only self-attention masks the future (a path of its own knows; the registry's modules say so).
        self.causal = getattr(self.path, "causal", None)
        if self.causal is None:
            self.causal = any(getattr(module, "is_causal", False) for module, *_ in self.sites)
        self.path.install(self.tower, self.sites, ProviderRef(provider))
        # Attention modules outside the language model that read its config (Kosmos-2's image-to-text projection:
        # latent queries attending to the image) reach peft-ipt's attention once the language model's
        # implementation is switched: they take no prefix and run the model's own implementation.
        self.outside = outside_attention(model, self.tower) if self.multimodal else []
        for module in self.outside:
            module.__dict__[NOT_TOKENS_ATTR] = True
        setattr(model, self.MARK, True)

    def enable(self) -> None:
        self.path.enable(self.tower)

    def check_routed(self) -> None:
        """Refuse (or follow) a change of the model's attention implementation since installation."""
        self.path.check_routed(self.tower)

    def disable(self) -> None:
        self.path.disable(self.tower)  # the user's own attention, bit for bit

    def remove(self) -> None:
        self.path.remove(self.tower, self.sites)
        for module in self.outside:
            module.__dict__.pop(NOT_TOKENS_ATTR, None)
        if self.MARK in self.model.__dict__:
            delattr(self.model, self.MARK)
