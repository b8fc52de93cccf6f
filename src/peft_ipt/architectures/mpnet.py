"""MPNet: BERT's attention plus a relative-position bias over (query, key), no registry and no cache.

The door replaces the forward of each ``MPNetSelfAttention`` module on the instance, as DeBERTa's does. With no prefix
for the call it runs the original forward, untouched. With one, :func:`_attend` computes the attention itself:

- queries, keys and values from the module's own ``q``, ``k``, ``v``;
- scores against the prefix keys and the input's keys, scaled by sqrt(head size);
- the encoder's position bias over the input's keys alone, with zeros in the prefix columns: a prefix key has no
  position, so it gets the content score only;
- the mask widened so every query sees the prefix, softmax, the module's dropout, values, and ``o``.

Without a prefix it computes what the original forward computes (tested against it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import SITE_ATTR, match_batch, widen_mask
from .path import ArchitecturePath, ForwardDoorInstallation

ATTENTION_CLASS = "MPNetSelfAttention"


def _project(module: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v, each (B, H, T, hd), as the module computes them."""
    shape = (*hidden.shape[:-1], -1, module.attention_head_size)
    return tuple(proj(hidden).view(shape).transpose(1, 2) for proj in (module.q, module.k, module.v))


def _attend(
    module: nn.Module,
    prefix: tuple,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_bias: torch.Tensor | None,
    output_attentions: bool,
):
    query, key, value = _project(module, hidden_states)
    batch, _, q_len, _ = query.shape
    prefix_key, prefix_value, *valid = prefix  # (B|1, H, P, hd)
    length = prefix_key.shape[2]
    keys = torch.cat([match_batch(prefix_key, batch).to(key.dtype), key], dim=2)
    values = torch.cat([match_batch(prefix_value, batch).to(value.dtype), value], dim=2)
    scores = query @ keys.transpose(-1, -2) / math.sqrt(module.attention_head_size)
    if position_bias is not None:
        scores = scores + F.pad(position_bias, (length, 0))  # no position bias towards the prefix
    valid = match_batch(valid[0], batch) if valid else None
    mask = widen_mask(attention_mask, length, q_len, key.shape[2], False, valid, query.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = module.dropout(F.softmax(scores, dim=-1))
    context = (probs @ values).permute(0, 2, 1, 3).reshape(batch, q_len, -1)  # (B, T, H * hd)
    output = module.o(context)
    return (output, probs) if output_attentions else (output,)


def _door_forward(
    self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs
):
    """The forward of a prepared ``MPNetSelfAttention``: the class's own without a prefix, else _attend."""
    site = self.__dict__[SITE_ATTR]
    provider = site.provider()
    if provider is not None and provider.capturing:
        _, key, value = _project(self, hidden_states)
        provider.capture(site, key, value)
    prefix = provider.prefix_for(site) if provider is not None else None
    if prefix is None:
        return type(self).forward(
            self, hidden_states, attention_mask, position_bias, output_attentions, **kwargs
        )
    return _attend(self, prefix, hidden_states, attention_mask, position_bias, output_attentions)


@dataclass(frozen=True)
class MPNetPath(ArchitecturePath):
    model_type: str
    attention_class = ATTENTION_CLASS
    door_forward = staticmethod(_door_forward)
    installation = ForwardDoorInstallation


MPNET_PATHS = (MPNetPath("mpnet"),)
