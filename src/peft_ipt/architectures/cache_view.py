"""Models that hand each attention call its layer's cache: the decoders GPT-J and CodeGen (transformers 5.23), Bloom,
Falcon, GPT-Neo, GPT-NeoX-Japanese, MPT and XGLM, the BERT-like RoFormer, RemBERT, Megatron-BERT and BigBird (in
full attention), as encoders and as decoders, and TAPAS (an encoder).

Their attention modules compute this step's keys and values, then call ``cache.update(key, value, layer)`` and
attend over what it returns. The door, a forward pre-hook on each attention module, stands a :class:`PrefixedCache`
in for that argument (also when there is no cache, in training): its ``update`` passes the call on to the real cache
and returns the prefix in front of the result, so the cache never holds the prefix and positions stay the model's
own. The hook widens the attention mask by the prefix columns, and the ALiBi bias of Bloom and Falcon by as many
zeros: a prefix key sits where the first token does.

Where a model places keys by their index in its own tables, a prefix key gets no position, so a left-padded row
attends as it does alone (peft's PrefixTuning, which puts P tokens in front of the padding, does not):
- GPT-Neo slices its causal table by the number of keys. Causality needs no help, but a local layer's window would
  drop the prefix once a query is P + padding past it; while a prefix is in, a local layer attends through a table
  whose prefix columns every query sees (the window between the model's own tokens is unchanged).
- MPT slices its ALiBi bias (a slope times the key's index) by the number of keys too; the door hands it a bias of
  its own over (query, key), in which each prefix key gets the bias of the query's own index: distance zero.
XGLM adds its positions to the input, so its keys carry none.

RoFormer, RemBERT, Megatron-BERT and TAPAS call ``update`` on whatever cache they are handed, also in an encoder, which
runs without one: the view stands in there too, and the prefix is in front of the keys. One attention class serves
encoders and (``is_decoder``) decoders, so the config says whether a mask built here masks the future. Only the
self-attention takes a prefix; a decoder's cross-attention (``crossattention``, the same class) takes none, as
XGLM's. RoFormer rotates keys by their position and numbers positions from the padding, with no position_ids; a
prefix key carries no rotation, so the door counts each left-padded row's positions from its first token (see
:func:`_rotary_from_first_tokens`). RemBERT and Megatron-BERT add their positions to the input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import EncoderDecoderCache

from ..attention import SELF, SITE_ATTR, AttentionSite, UnsupportedModelError, match_batch, widen_mask
from .path import ArchitecturePath, HookedInstallation


class PrefixedCache:
    """One attention call's stand-in for its layer's cache (or for none): ``update`` returns the prefix in front
    of the cached and new keys/values; everything else is the real cache's."""

    def __init__(
        self, inner, keys: torch.Tensor | None, values: torch.Tensor | None, capture: Callable | None
    ):
        self._inner = inner
        self._prefix = (keys, values)
        self._capture = capture

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self._capture is not None:
            self._capture(key, value)
        if self._inner is not None:
            key, value = self._inner.update(key, value, layer_idx, *args, **kwargs)
        keys, values = self._prefix
        if keys is None:
            return key, value
        return torch.cat([keys.to(key.dtype), key], dim=2), torch.cat([values.to(value.dtype), value], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._inner.get_seq_length(layer_idx) if self._inner is not None else 0

    def __getattr__(self, name: str):
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(f"no cache in this call, so no {name!r}")
        return getattr(inner, name)


class _CacheViewInstallation(HookedInstallation):
    """The path installed on one model: its hooks, removed again by ``remove``."""

    causal = True

    def sites(self, model: nn.Module) -> list[tuple[nn.Module, str, int, int, int]]:
        spec = self.spec
        if spec.causal_by_config:
            self.causal = bool(getattr(model.config, "is_decoder", False))
        found = [
            m
            for name, m in model.named_modules()
            if type(m).__name__ == spec.attention_class and name.endswith(spec.module_name)
        ]
        return [
            (m, SELF, getattr(m, spec.layer_attr), spec.kv_heads(m), getattr(m, spec.head_dim_attr))
            for m in found
        ]

    def install(self, model: nn.Module, sites, provider_ref) -> None:
        tables: dict = {}  # GPT-Neo's local tables with prefix columns, shared by the model's local layers
        rotary = None
        if self.spec.rotary_table_class is not None:  # RoFormer's sinusoidal table, which the model slices
            rotary = next(m for m in model.modules() if type(m).__name__ == self.spec.rotary_table_class)
        for module, kind, layer, n_kv, head_dim in sites:
            site = AttentionSite(kind, layer, n_kv, head_dim, inner=None, provider=provider_ref)
            site.door = (self.spec, tables, self.cache_keyword(module), self.causal, rotary)
            # The hook finds its site through the module, so a copied model's hooks serve the copy's sites.
            module.__dict__[SITE_ATTR] = site
            self._handles.append(module.register_forward_pre_hook(_before_attention, with_kwargs=True))
            if self.spec.windowed_table:
                # puts the module's own table back after every call, one that raised included
                self._handles.append(module.register_forward_hook(_after_attention, always_call=True))


BLOCK_SPARSE = (
    "BigBird's block-sparse attention (attention_type='block_sparse', its config's default and its checkpoints') "
    "attends in blocks of global, sliding and random keys, where a prefix has no place. "
)
FULL_ATTENTION_FIX = (
    "Load it with full attention, from_pretrained(..., attention_type='original_full'), or call its backbone's "
    "set_attention_type('original_full') (model.bert.set_attention_type on BigBird's task models) before "
    "get_peft_model (inputs up to (5 + 2 * num_random_blocks) * block_size tokens run in full attention anyway)."
)
CROSS_ATTENTION = (
    "BigBird with cross-attention (add_cross_attention=True) is refused: transformers' BigBirdLayer hands the "
    "encoder's states to its self-attention as well, so that attention reads the encoder's memory, not the decoder's "
    "own tokens, and a prefix there would sit among the memory keys. Use BigBird as an encoder, or as a causal LM "
    "without cross-attention."
)


class _BigBirdInstallation(_CacheViewInstallation):
    """BigBird's full attention (``original_full``) is RemBERT's; its block-sparse attention takes no prefix, and
    ``set_attention_type`` replaces the attention modules, doors and all, so a switch after installation is refused
    at the next call rather than run without the prefix."""

    def sites(self, model: nn.Module):
        if _block_sparse(model):
            raise UnsupportedModelError(BLOCK_SPARSE + FULL_ATTENTION_FIX)
        if any(hasattr(m, "crossattention") for m in model.modules()):
            raise UnsupportedModelError(CROSS_ATTENTION)
        return super().sites(model)

    def check_routed(self, model: nn.Module) -> None:
        # (a copied or unpickled model's doors are its own modules' attributes)
        doorless = any(
            type(m).__name__ == "BigBirdAttention" and SITE_ATTR not in m.self.__dict__
            for m in model.modules()
        )
        if not doorless and not _block_sparse(model):
            return
        raise UnsupportedModelError(
            "BigBird's attention modules were replaced after get_peft_model (set_attention_type(...) builds new "
            "ones, also when switching back to 'original_full'), so its layers would run without the prefix. "
            "To go on: save the adapter (save_pretrained), unload() it, put the model in full attention "
            "(set_attention_type('original_full') on its backbone) and load the adapter again "
            "(PeftModel.from_pretrained); do not switch the attention type while an adapter is on."
        )


def _block_sparse(model: nn.Module) -> bool:
    """Whether any of BigBird's model or attention modules is set to block-sparse attention."""
    return any(
        type(m).__name__ in ("BigBirdModel", "BigBirdAttention")
        and getattr(m, "attention_type", "original_full") != "original_full"
        for m in model.modules()
    )


def _before_attention(module: nn.Module, args: tuple, kwargs: dict):
    """The door: a forward pre-hook that stands a PrefixedCache in for the layer's cache argument."""
    site = module.__dict__[SITE_ATTR]
    spec, tables, cache_arg, causal, rotary = site.door
    provider = site.provider()
    if provider is None:
        return None
    cache = kwargs.get(cache_arg)
    if isinstance(cache, EncoderDecoderCache):  # XGLM with cross-attention: this self-attention's half
        cache = cache.self_attention_cache
    if provider.capturing:
        record = lambda key, value: provider.capture(site, key, value)  # noqa: E731
        return args, {**kwargs, cache_arg: PrefixedCache(cache, None, None, record)}
    prefix = provider.prefix_for(site)
    if prefix is None:
        return None
    hidden = kwargs.get("hidden_states", args[0] if args else None)  # (B, T, d)
    batch, q_len = hidden.shape[:2]
    prefix_key, prefix_value, *valid = prefix  # (B|1, n_kv, P, head_dim)
    if prefix_key.shape[1] != site.n_kv_heads:
        raise RuntimeError(
            f"peft_ipt: the prefix at layer {site.layer} has {prefix_key.shape[1]} key/value heads but "
            f"{type(module).__name__} has {site.n_kv_heads}: the adapter was built for another model"
        )
    length = prefix_key.shape[2]
    key_len = q_len + (cache.get_seq_length(site.layer) if cache is not None else 0)
    valid = match_batch(valid[0], batch) if valid else None
    kwargs = dict(kwargs)
    if rotary is not None and kwargs.get("sinusoidal_pos") is not None:
        kwargs["sinusoidal_pos"] = _rotary_from_first_tokens(
            rotary, kwargs["sinusoidal_pos"], kwargs.get("attention_mask"), key_len, q_len
        )
    kwargs[cache_arg] = PrefixedCache(
        cache, match_batch(prefix_key, batch), match_batch(prefix_value, batch), None
    )
    mask = widen_mask(
        kwargs.get("attention_mask"),
        length,
        q_len,
        key_len,
        causal and not spec.masks_future_itself,
        valid,
        hidden.device,
        masked_is_true=spec.masked_is_true,
    )
    if spec.additive_mask and mask is not None and mask.dtype == torch.bool:
        # widen_mask built the mask itself (the model passed none): the module adds it to its scores
        mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(hidden.dtype).min
        )
    kwargs["attention_mask"] = mask
    if spec.bias_arg is not None and kwargs.get(spec.bias_arg) is not None:
        kwargs[spec.bias_arg] = F.pad(kwargs[spec.bias_arg], (length, 0))
    if spec.key_index_bias_arg is not None and kwargs.get(spec.key_index_bias_arg) is not None:
        kwargs[spec.key_index_bias_arg] = _bias_with_prefix(
            kwargs[spec.key_index_bias_arg], length, q_len, key_len
        )
    if spec.windowed_table and getattr(module, "attention_type", None) == "local":
        module.__dict__[OWN_TABLE_ATTR] = module.bias
        module.bias = _table_with_prefix(module.bias, length, tables)
    return args, kwargs


OWN_TABLE_ATTR = "_peft_ipt_own_table"


def _after_attention(module: nn.Module, _args, _output) -> None:
    own = module.__dict__.pop(OWN_TABLE_ATTR, None)
    if own is not None:
        module.bias = own


def _table_with_prefix(own: torch.Tensor, length: int, tables: dict) -> torch.Tensor:
    """GPT-Neo's causal table (1, 1, L, L), which its attention slices by the number of keys, for ``length`` prefix
    keys in front: the model's own pattern between its tokens, and the prefix columns seen by every query."""
    key = (length, own.shape[-1], own.device)
    table = tables.get(key)
    if table is None:
        size = own.shape[-1] + length
        table = torch.ones((1, 1, size, size), dtype=torch.bool, device=own.device)
        table[..., length:, length:] = own
        tables[key] = table
    return table


def _rotary_from_first_tokens(
    table: nn.Module, rotary: torch.Tensor, mask: torch.Tensor | None, key_len: int, q_len: int
) -> torch.Tensor:
    """RoFormer's rotary angles, (1, 1, T, hd) as the model hands them, per row (B, 1, T, hd), each left-padded row's
    positions counted from its first token.

    RoFormer numbers positions from the padding and takes no position_ids. Without a prefix that changes nothing
    (rotary positions enter attention only as differences), but a prefix key carries no rotation, so its scores would
    move with the padding in front of a row. A row is renumbered where the last query's keys are one run of visible
    keys after hidden ones; every other row keeps the model's numbering (what the tuner does for rotary models that
    take position_ids)."""
    if mask is None:
        return rotary
    last = mask[:, 0, -1, :]  # (B, keys): what the last query sees
    ones = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    if ones.shape[-1] != key_len:
        return rotary
    rises = (ones[:, 1:] & ~ones[:, :-1]).sum(1)
    renumber = ~ones[:, 0] & ones[:, -1] & (rises == 1)
    # every row through one lookup, no branch on the data (torch.export); rows kept as numbered get the model's angles
    numbered = torch.arange(key_len - q_len, key_len, device=mask.device)
    padding = torch.where(renumber, key_len - ones.sum(-1), 0)
    positions = (numbered[None] - padding[:, None]).clamp(min=0)  # the padding itself at 0, as the tuner does
    return F.embedding(positions, table.weight).to(rotary.dtype)[:, None]


def _bias_with_prefix(bias: torch.Tensor, length: int, q_len: int, key_len: int) -> torch.Tensor:
    """MPT's ALiBi bias (heads, 1, L), a slope times the key's index counted back from the last, which its attention
    slices to the last ``key_len`` columns: over (heads, query, prefix + keys), each prefix key with the bias of the
    query's own key, so that it sits at distance zero from every query, wherever padding puts the query."""
    own = bias[..., -key_len:]  # (heads, 1, keys): what the module would have taken
    at_queries = own[:, 0, -q_len:]  # (heads, queries): each query's own key
    prefix = at_queries[:, :, None].expand(-1, -1, length)
    return torch.cat([prefix, own.expand(-1, q_len, -1)], dim=-1)


@dataclass(frozen=True)
class CacheViewPath(ArchitecturePath):
    model_type: str
    attention_class: str  # the modules to open, by class name (flash-attention classes are refused earlier)
    kv_heads: Callable[[nn.Module], int]  # heads of the keys the module passes to update()
    bias_arg: str | None = None  # an additive position bias over keys, (..., keys), padded by zeros: ALiBi
    # the keywords that may hand the module its cache; it takes the first its forward accepts
    cache_args: tuple[str, ...] = ("layer_past",)
    layer_attr: str = "layer_idx"  # the module's attribute holding its layer index
    head_dim_attr: str = "head_dim"  # and the one holding its head size
    module_name: str = ""  # only modules whose qualified name ends so (XGLM: self-attention, not cross)
    masks_future_itself: bool = False  # a causal mask of its own over the keys (GPT-Neo): none is built here
    additive_mask: bool = False  # the module adds the mask to its scores, so one built here is made additive
    masked_is_true: bool = False  # a bool mask where True hides a key (MPT)
    # ALiBi by key index, sliced by the module (MPT): see _bias_with_prefix
    key_index_bias_arg: str | None = None
    windowed_table: bool = False  # local layers slice a causal table by the number of keys (GPT-Neo)
    # the same attention serves encoders and decoders (RoFormer, RemBERT, Megatron-BERT): config.is_decoder says
    causal_by_config: bool = False
    # the class of the model's rotary table, whose slice reaches the modules as sinusoidal_pos (RoFormer)
    rotary_table_class: str | None = None
    installation = _CacheViewInstallation


def _falcon_kv_heads(module: nn.Module) -> int:
    # Falcon's new decoder architecture expands its key/value heads to every query head before the cache.
    return module.num_heads if module.new_decoder_architecture else module.num_kv_heads


@dataclass(frozen=True)
class BigBirdPath(CacheViewPath):
    """BigBird in full attention, as RemBERT; block-sparse attention refused (see _BigBirdInstallation)."""

    installation = _BigBirdInstallation


CACHE_VIEW_PATHS = (
    CacheViewPath("gptj", "GPTJAttention", attrgetter("num_attention_heads")),
    CacheViewPath("codegen", "CodeGenAttention", attrgetter("num_attention_heads")),
    CacheViewPath("bloom", "BloomAttention", attrgetter("num_heads"), bias_arg="alibi"),
    CacheViewPath("falcon", "FalconAttention", _falcon_kv_heads, bias_arg="alibi"),
    CacheViewPath(
        "gpt_neo",
        "GPTNeoSelfAttention",
        attrgetter("num_heads"),
        layer_attr="layer_id",
        masks_future_itself=True,
        additive_mask=True,
        windowed_table=True,
    ),
    CacheViewPath(
        "gpt_neox_japanese",
        "GPTNeoXJapaneseAttention",
        attrgetter("num_attention_heads"),
        head_dim_attr="head_size",
        additive_mask=True,
    ),
    CacheViewPath(
        "mpt",
        "MptAttention",
        attrgetter("n_heads"),
        cache_args=("cache", "past_key_values"),
        masked_is_true=True,
        key_index_bias_arg="position_bias",
    ),
    *(
        # BERT-like encoders, decoders with is_decoder: self-attention only ("crossattention.self" is left out)
        path(
            model_type,
            attention_class,
            attrgetter("num_attention_heads"),
            cache_args=("cache", "past_key_values"),
            module_name=".attention.self",
            head_dim_attr="attention_head_size",
            additive_mask=True,
            causal_by_config=True,
            rotary_table_class=table,
        )
        for path, model_type, attention_class, table in (
            (CacheViewPath, "roformer", "RoFormerSelfAttention", "RoFormerSinusoidalPositionalEmbedding"),
            (CacheViewPath, "rembert", "RemBertSelfAttention", None),
            (CacheViewPath, "megatron-bert", "MegatronBertSelfAttention", None),
            (CacheViewPath, "tapas", "TapasSelfAttention", None),  # an encoder only
            (BigBirdPath, "big_bird", "BigBirdSelfAttention", None),  # in full attention only
        )
    ),
    CacheViewPath(
        "xglm",
        "XGLMAttention",
        attrgetter("num_heads"),
        cache_args=("cache", "past_key_values"),
        module_name="self_attn",
        additive_mask=True,
    ),
)
