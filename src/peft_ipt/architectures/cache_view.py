"""Decoders that hand each attention call its layer's cache: GPT-J, CodeGen, Bloom and Falcon (transformers 5.23).

Their attention modules compute this step's keys and values, then call ``cache.update(key, value, layer)`` and
attend over what it returns. The door, a forward pre-hook on each attention module, stands a :class:`PrefixedCache`
in for that argument (also when there is no cache, in training): its ``update`` passes the call on to the real cache
and returns the prefix in front of the result, so the cache never holds the prefix and positions stay the model's
own. The hook widens the attention mask by the prefix columns, and the ALiBi bias of Bloom and Falcon by as many
zeros: a prefix key sits where the first token does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import SELF, SITE_ATTR, AttentionSite, match_batch, widen_mask
from .path import ArchitecturePath, Installation


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


class _CacheViewInstallation(Installation):
    """The path installed on one model: its hooks, removed again by ``remove``."""

    causal = True

    def __init__(self, spec: CacheViewPath):
        super().__init__(spec)
        self._handles: list = []

    def sites(self, model: nn.Module) -> list[tuple[nn.Module, str, int, int, int]]:
        found = [m for m in model.modules() if type(m).__name__ == self.spec.attention_class]
        return [(m, SELF, m.layer_idx, self.spec.kv_heads(m), m.head_dim) for m in found]

    def install(self, model: nn.Module, sites, provider_ref) -> None:
        for module, kind, layer, n_kv, head_dim in sites:
            site = AttentionSite(kind, layer, n_kv, head_dim, inner=None, provider=provider_ref)
            site.door = self.spec.bias_arg
            # The hook finds its site through the module, so a copied model's hooks serve the copy's sites.
            module.__dict__[SITE_ATTR] = site
            self._handles.append(module.register_forward_pre_hook(_before_attention, with_kwargs=True))

    def remove(self, model: nn.Module, sites) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, *_ in sites:
            module.__dict__.pop(SITE_ATTR, None)


def _before_attention(module: nn.Module, args: tuple, kwargs: dict):
    """The door: a forward pre-hook that stands a PrefixedCache in for the layer's cache argument."""
    site = module.__dict__[SITE_ATTR]
    bias_arg = site.door
    provider = site.provider()
    if provider is None:
        return None
    cache = kwargs.get("layer_past")
    if provider.capturing:
        record = lambda key, value: provider.capture(site, key, value)  # noqa: E731
        return args, {**kwargs, "layer_past": PrefixedCache(cache, None, None, record)}
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
    kwargs["layer_past"] = PrefixedCache(
        cache, match_batch(prefix_key, batch), match_batch(prefix_value, batch), None
    )
    kwargs["attention_mask"] = widen_mask(
        kwargs.get("attention_mask"), length, q_len, key_len, True, valid, hidden.device
    )
    if bias_arg is not None and kwargs.get(bias_arg) is not None:
        kwargs[bias_arg] = F.pad(kwargs[bias_arg], (length, 0))
    return args, kwargs


@dataclass(frozen=True)
class CacheViewPath(ArchitecturePath):
    model_type: str
    attention_class: str  # the modules to open, by class name (flash-attention classes are refused earlier)
    kv_heads: Callable[[nn.Module], int]  # heads of the keys the module passes to update()
    bias_arg: str | None = None  # an additive position bias over keys, (..., keys): ALiBi
    installation = _CacheViewInstallation


def _falcon_kv_heads(module: nn.Module) -> int:
    # Falcon's new decoder architecture expands its key/value heads to every query head before the cache.
    return module.num_heads if module.new_decoder_architecture else module.num_kv_heads


CACHE_VIEW_PATHS = (
    CacheViewPath("gptj", "GPTJAttention", attrgetter("num_attention_heads")),
    CacheViewPath("codegen", "CodeGenAttention", attrgetter("num_attention_heads")),
    CacheViewPath("bloom", "BloomAttention", attrgetter("num_heads"), bias_arg="alibi"),
    CacheViewPath("falcon", "FalconAttention", _falcon_kv_heads, bias_arg="alibi"),
)
