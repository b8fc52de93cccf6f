"""MVP: a BART-like encoder-decoder whose attention modules compute attention themselves (no registry).

Each ``MvpAttention`` call takes its layer's cache and, when it has one, calls ``cache.update(key, value, layer)``
and attends over what that returns. The door, a forward pre-hook on each module (the encoder's self-attention, the
decoder's self-attention and its cross-attention), stands a :class:`~.cache_view.PrefixedCache` in for that
argument, as the decoders of :mod:`.cache_view` do: the prefix comes back in front of the keys and values, the cache
never holds it, and the mask is widened by the prefix columns (every query sees them; in a mixed-adapter batch, only
each row's own). A prefix key has no position (MVP adds learned positions to its input, not to keys).

- The decoder's self-attention passes its update on to the self-attention half of the model's encoder-decoder cache.
- The cross-attention gets a view with no cache behind it: with a prefix in, it computes the encoder's keys and
  values at every decoding step (what the model does without a cache) instead of reading them from the cache,
  whose cross-attention half the model would otherwise fill once and then read without calling ``update``.

MVP's own ``attn_prompt`` (its config's ``use_prompt``) takes one prompt for the whole batch, so it cannot carry an
instance-wise prompt; a model that uses it keeps it, in front of the prefix. With the same weights MVP computes what BART
computes, so the tests hold this path to the registry path's BART, logit for logit.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache

from ..attention import (
    CROSS,
    DECODER,
    ENCODER,
    SITE_ATTR,
    AttentionSite,
    UnsupportedModelError,
    _first_int,
    match_batch,
    widen_mask,
)
from .cache_view import PrefixedCache
from .path import ArchitecturePath, Installation


class _MvpInstallation(Installation):
    """The path installed on one model: its hooks, removed again by ``remove``."""

    causal = True  # as the registry path finds for BART: the decoder's self-attention masks the future

    def __init__(self, spec: MvpPath):
        super().__init__(spec)
        self._handles: list = []

    def sites(self, model: nn.Module) -> list[tuple[nn.Module, str, int, int, int]]:
        encoder_ids = {id(m) for m in model.get_encoder().modules()}
        found = []
        for name, module in model.named_modules():
            if type(module).__name__ != self.spec.attention_class:
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
            site.door = self._cache_arg(module)
            # The hook finds its site through the module, so a copied model's hooks serve the copy's sites.
            module.__dict__[SITE_ATTR] = site
            self._handles.append(module.register_forward_pre_hook(_before_attention, with_kwargs=True))

    def _cache_arg(self, module: nn.Module) -> str:
        """The keyword the module takes its cache by (``cache`` from transformers 5.24, ``past_key_values`` before)."""
        accepted = inspect.signature(module.forward).parameters
        for name in ("cache", "past_key_values"):
            if name in accepted:
                return name
        raise UnsupportedModelError(
            f"{type(module).__name__}.forward takes no cache argument in this transformers version, so peft-ipt "
            "cannot put a prefix in front of its keys; use a transformers version from the range pyproject admits"
        )

    def remove(self, model: nn.Module, sites) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, *_ in sites:
            module.__dict__.pop(SITE_ATTR, None)


def _before_attention(module: nn.Module, args: tuple, kwargs: dict):
    """The door: a forward pre-hook that stands a PrefixedCache in for the module's cache argument."""
    site = module.__dict__[SITE_ATTR]
    provider = site.provider()
    if provider is None:
        return None
    cache_arg = site.door
    cache = kwargs.get(cache_arg)
    if site.kind == CROSS:
        cache = None  # recompute the encoder's keys/values (see the module's docstring)
    elif isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    if provider.capturing:
        record = lambda key, value: provider.capture(site, key, value)  # noqa: E731
        return args, {**kwargs, cache_arg: PrefixedCache(cache, None, None, record)}
    prefix = provider.prefix_for(site)
    if prefix is None:
        return None
    hidden = kwargs.get("hidden_states", args[0] if args else None)  # (B, T, d)
    batch, q_len = hidden.shape[:2]
    prefix_key, prefix_value, *valid = prefix  # (B|1, heads, P, head_dim)
    if prefix_key.shape[1] != site.n_kv_heads:
        raise RuntimeError(
            f"peft_ipt: the prefix at layer {site.layer} has {prefix_key.shape[1]} heads but "
            f"{type(module).__name__} has {site.n_kv_heads}: the adapter was built for another model"
        )
    source = kwargs.get("key_value_states")
    if site.kind == CROSS:
        key_len = source.shape[1]
    else:
        key_len = q_len + (cache.get_seq_length(site.layer) if cache is not None else 0)
    valid = match_batch(valid[0], batch) if valid else None
    mask = widen_mask(
        kwargs.get("attention_mask"),
        prefix_key.shape[2],
        q_len,
        key_len,
        site.kind == DECODER,
        valid,
        hidden.device,
    )
    if mask is not None and mask.dtype == torch.bool:  # built here (the model passed none): MVP adds masks
        mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(hidden.dtype).min
        )
    view = PrefixedCache(cache, match_batch(prefix_key, batch), match_batch(prefix_value, batch), None)
    return args, {**kwargs, cache_arg: view, "attention_mask": mask}


@dataclass(frozen=True)
class MvpPath(ArchitecturePath):
    model_type: str
    attention_class: str  # the modules to open, by class name
    cross_name: str  # the qualified-name ending of the decoder's cross-attention modules
    installation = _MvpInstallation


MVP_PATHS = (MvpPath("mvp", "MvpAttention", cross_name="encoder_attn"),)
