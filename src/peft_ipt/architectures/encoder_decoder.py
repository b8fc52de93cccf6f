"""Encoder-decoders whose attention modules compute attention themselves (no registry): MVP, FSMT and LED.

Each attention call takes its layer's cache and, when it has one, calls ``cache.update(key, value, layer)`` and
attends over what that returns. The door, a forward pre-hook on each module (the encoder's self-attention, the
decoder's self-attention and its cross-attention), stands a :class:`~.cache_view.PrefixedCache` in for that
argument, as the decoders of :mod:`.cache_view` do: the prefix comes back in front of the keys and values, the cache
never holds it, and the masks are widened by the prefix columns (every query sees them; in a mixed-adapter batch,
only each row's own). A prefix key has no position (both models add their positions to the input, not to keys).

- The decoder's self-attention passes its update on to the self-attention half of the model's encoder-decoder cache.
- The cross-attention gets a view with no cache behind it: with a prefix in, it computes the encoder's keys and
  values at every decoding step (what the model does without a cache) instead of reading them from the cache,
  whose cross-attention half the model would otherwise fill once and then read without calling ``update``.

MVP: BART's layout and masks (one additive (B, 1, T, S) ``attention_mask``). Its own ``attn_prompt`` (its config's
``use_prompt``) takes one prompt for the whole batch, so it cannot carry an instance-wise prompt; a model that uses
it keeps it, in front of the prefix. With the same weights MVP computes what BART computes, so the tests hold this
path to the registry path's BART, logit for logit.

FSMT: time-major states (T, B, d), an additive ``attn_mask`` over (T, S) and a bool ``key_padding_mask`` (B, S)
where True hides a key; the door widens both.

LED: its decoder is BART's (MVP's door serves its self- and cross-attention); its encoder attends in Longformer's
sliding windows and global tokens, which no cache view reaches. A config must say ``encoder_prefix=False`` (what
peft's PrefixTuning tunes on LED: the decoder's side only); left on, it is refused with that fix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import EncoderDecoderCache

from ..attention import (
    CROSS,
    DECODER,
    ENCODER,
    SITE_ATTR,
    AttentionSite,
    _first_int,
    match_batch,
    widen_mask,
)
from .cache_view import PrefixedCache
from .path import ArchitecturePath, HookedInstallation


class _EncoderDecoderInstallation(HookedInstallation):
    """The path installed on one model: its hooks, removed again by ``remove``."""

    causal = True  # as the registry path finds for BART: the decoder's self-attention masks the future

    @property
    def unserved(self) -> dict[str, str]:
        return {ENCODER: self.spec.encoder_refused} if self.spec.encoder_refused else {}

    def sites(self, model: nn.Module) -> list[tuple[nn.Module, str, int, int, int]]:
        encoder_ids = {id(m) for m in model.get_encoder().modules()}
        found = []
        for name, module in model.named_modules():
            cls = type(module)
            if cls.__name__ != self.spec.attention_class or not cls.__module__.endswith(self.spec.modeling):
                continue
            if id(module) in encoder_ids:
                kind = ENCODER
            else:
                kind = CROSS if name.endswith(self.spec.cross_name) else DECODER
            found.append((module, kind, _first_int(name), module.num_heads, module.head_dim))
        return found

    def install(self, model: nn.Module, sites, provider_ref) -> None:
        for module, kind, layer, n_kv, head_dim in sites:
            site = AttentionSite(kind, layer, n_kv, head_dim, inner=None, provider=provider_ref)
            site.door = (self.spec, self.cache_keyword(module))
            # The hook finds its site through the module, so a copied model's hooks serve the copy's sites.
            module.__dict__[SITE_ATTR] = site
            self._handles.append(module.register_forward_pre_hook(_before_attention, with_kwargs=True))


def _before_attention(module: nn.Module, args: tuple, kwargs: dict):
    """The door: a forward pre-hook that stands a PrefixedCache in for the module's cache argument."""
    site = module.__dict__[SITE_ATTR]
    provider = site.provider()
    if provider is None:
        return None
    spec, cache_arg = site.door
    cache = kwargs.get(cache_arg)
    if site.kind == CROSS:
        cache = None  # recompute the encoder's keys/values (see the module's docstring)
    elif isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    if provider.capturing:
        record = lambda key, value: provider.capture(site, key, value)  # noqa: E731
        return args, {**kwargs, cache_arg: _view(site, PrefixedCache(cache, None, None, record))}
    prefix = provider.prefix_for(site)
    if prefix is None:
        return None
    hidden = kwargs.get(spec.query_arg, args[0] if args else None)
    batch, q_len = (hidden.shape[1], hidden.shape[0]) if spec.time_major else hidden.shape[:2]
    prefix_key, prefix_value, *valid = prefix  # (B|1, heads, P, head_dim)
    if prefix_key.shape[1] != site.n_kv_heads:
        raise RuntimeError(
            f"peft_ipt: the prefix at layer {site.layer} has {prefix_key.shape[1]} heads but "
            f"{type(module).__name__} has {site.n_kv_heads}: the adapter was built for another model"
        )
    if site.kind == CROSS:
        source = kwargs.get(spec.source_arg)
        key_len = source.shape[0] if spec.time_major else source.shape[1]
    else:
        key_len = q_len + (cache.get_seq_length(site.layer) if cache is not None else 0)
    valid = match_batch(valid[0], batch) if valid else None
    kwargs = dict(kwargs)
    view = PrefixedCache(cache, match_batch(prefix_key, batch), match_batch(prefix_value, batch), None)
    kwargs[cache_arg] = _view(site, view)
    spec.widen(kwargs, prefix_key.shape[2], q_len, key_len, site.kind == DECODER, valid, hidden)
    return args, kwargs


def _view(site: AttentionSite, view: PrefixedCache):
    """A self-attention takes the view as its cache; a cross-attention an encoder-decoder cache around it."""
    return _CrossAttentionCache(view) if site.kind == CROSS else view


class _CrossAttentionCache(EncoderDecoderCache):
    """What a cross-attention call is handed: an encoder-decoder cache whose cross-attention half is the view and
    whose layers are never updated, so the module computes the encoder's keys/values and calls ``update``. (FSMT
    reads ``is_updated`` only from an encoder-decoder cache, and fails on any other.)"""

    def __init__(self, view: PrefixedCache):  # not the parent's: nothing else of a cache is read here
        self.self_attention_cache = self.cross_attention_cache = view
        self.is_updated = {}


def _widen_bart(kwargs: dict, length: int, q_len: int, key_len: int, causal: bool, valid, hidden) -> None:
    """BART's call (MVP, LED's decoder): one additive (B, 1, T, S) attention_mask, or none."""
    mask = widen_mask(kwargs.get("attention_mask"), length, q_len, key_len, causal, valid, hidden.device)
    # built here (the model passed none): the module adds masks to its scores
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(hidden.dtype).min
        )
    kwargs["attention_mask"] = mask


def _widen_fsmt(kwargs: dict, length: int, q_len: int, key_len: int, causal: bool, valid, hidden) -> None:
    """FSMT: an additive attn_mask over (T, S) (the decoder's causal one; (1, 1) at a decoding step, broadcast over
    the keys) and a bool key_padding_mask (B, S), True where a key is hidden."""
    attn_mask = kwargs.get("attn_mask")
    if attn_mask is not None:
        attn_mask = attn_mask.expand(*attn_mask.shape[:-2], q_len, key_len)
        # the prefix columns: 0 added, seen by every query
        kwargs["attn_mask"] = F.pad(attn_mask, (length, 0))
    padding = kwargs.get("key_padding_mask")
    if padding is None and valid is None:
        return
    batch = valid.shape[0] if valid is not None else padding.shape[0]
    hidden_prefix = (
        ~valid if valid is not None else torch.zeros(batch, length, dtype=torch.bool, device=hidden.device)
    )
    if padding is None:
        padding = torch.zeros(batch, key_len, dtype=torch.bool, device=hidden.device)
    kwargs["key_padding_mask"] = torch.cat([hidden_prefix, padding.to(torch.bool)], dim=1)


@dataclass(frozen=True)
class EncoderDecoderPath(ArchitecturePath):
    model_type: str
    attention_class: str  # the modules to open, by class name ...
    modeling: str  # ... defined in this modeling module (FSMT's class is plainly ``Attention``)
    cross_name: str  # the qualified-name ending of the decoder's cross-attention modules
    cache_args: tuple[str, ...]  # the keywords that may hand the module its cache; the first it accepts
    query_arg: str  # the keyword of the states that make the queries (and a self-attention's keys)
    source_arg: str  # the keyword of the encoder states a cross-attention call attends over
    time_major: bool  # states are (T, B, d), not (B, T, d)
    widen: Callable  # widens the call's masks by the prefix columns, in place
    # the encoder's attention has no door (LED): why, and the fix; its class is not ``attention_class``
    encoder_refused: str = ""
    installation = _EncoderDecoderInstallation


# BART's attention call: (B, T, d) states, the cross-attention's as key_value_states, one additive mask
BART_CALL = {
    "cross_name": "encoder_attn",
    "cache_args": ("cache", "past_key_values"),
    "query_arg": "hidden_states",
    "source_arg": "key_value_states",
    "time_major": False,
    "widen": _widen_bart,
}
ENCODER_DECODER_PATHS = (
    EncoderDecoderPath("mvp", "MvpAttention", "modeling_mvp", **BART_CALL),
    EncoderDecoderPath(
        "fsmt",
        "Attention",
        "modeling_fsmt",
        cross_name="encoder_attn",
        cache_args=("layer_state",),
        query_arg="query",
        source_arg="key",
        time_major=True,
        widen=_widen_fsmt,
    ),
    EncoderDecoderPath(
        "led",
        "LEDDecoderAttention",
        "modeling_led",
        **BART_CALL,
        encoder_refused=(
            "LED's encoder attends in Longformer's sliding windows and global tokens, which peft-ipt's prefixes do "
            "not reach. Set encoder_prefix=False to tune the decoder's self-attention and cross-attention prefixes "
            "(what peft's PrefixTuning tunes on LED)"
        ),
    ),
)
