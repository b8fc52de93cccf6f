"""DeBERTa and DeBERTa-v2: disentangled attention (content scores plus relative-position scores), no registry.

The door replaces the forward of each ``DisentangledSelfAttention`` module on the instance. With no prefix for the
call it runs the original forward, untouched. With one, :func:`_attend` computes the attention itself from the
module's own projections and its own relative-position scorer:

- queries, keys and values as the module computes them (v1: the fused ``in_proj`` with ``q_bias`` / ``v_bias``;
  v2: ``query_proj`` / ``key_proj`` / ``value_proj``);
- content scores against the prefix keys and the input's keys, with the module's scale;
- relative-position scores from the module's ``disentangled_att_bias`` / ``disentangled_attention_bias`` over the
  input's keys alone, with zeros in the prefix columns: a prefix key has no position, so it gets the content score
  only;
- the mask widened so every query sees the prefix, softmax, the module's dropout (and v1's talking heads), values.

Without a prefix it computes what the original forward computes (tested against it, to the last bit in float32).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import (
    SITE_ATTR,
    UnsupportedModelError,
    match_batch,
    widen_mask,
)
from .path import ArchitecturePath, ForwardDoorInstallation

ATTENTION_CLASS = "DisentangledSelfAttention"


def _scale(module: nn.Module, query: torch.Tensor, factor: int) -> torch.Tensor:
    """The module's own score scale, sqrt(head_dim * factor), as its modeling file computes it."""
    return sys.modules[type(module).__module__].scaled_size_sqrt(query, factor)


def _project_v1(module: nn.Module, hidden: torch.Tensor, query_states) -> tuple[torch.Tensor, ...]:
    """DeBERTa (v1): q, k, v, each (B, H, T, hd), and the scale factor of its scores."""
    if query_states is not None:
        raise UnsupportedModelError(
            "peft-ipt's DeBERTa path does not cover the enhanced mask decoder's separate query states; use "
            "DeBERTa for classification, tagging or QA, or DeBERTa-v2"
        )
    qkv = module.transpose_for_scores(module.in_proj(hidden))  # (B, H, T, 3 * hd)
    query, key, value = qkv.chunk(3, dim=-1)
    query = query + module.transpose_for_scores(module.q_bias[None, None, :])
    value = value + module.transpose_for_scores(module.v_bias[None, None, :])
    return query, key, value, 1 + len(module.pos_att_type)


def _project_v2(module: nn.Module, hidden: torch.Tensor, query_states) -> tuple[torch.Tensor, ...]:
    """DeBERTa-v2: q, k, v, each (B, H, T, hd), and the scale factor of its scores."""
    heads, batch = module.num_attention_heads, hidden.shape[0]
    source = hidden if query_states is None else query_states

    def split(x: torch.Tensor) -> torch.Tensor:  # (B * H, T, hd) -> (B, H, T, hd)
        return x.view(batch, heads, x.shape[1], x.shape[2])

    query = split(module.transpose_for_scores(module.query_proj(source), heads))
    key = split(module.transpose_for_scores(module.key_proj(hidden), heads))
    value = split(module.transpose_for_scores(module.value_proj(hidden), heads))
    factor = 1 + ("c2p" in module.pos_att_type) + ("p2c" in module.pos_att_type)
    return query, key, value, factor


def _position_scores_v1(module, query, key, relative_pos, rel_embeddings, factor):
    """(B, H, Tq, Tk) relative-position scores of v1, or None; ``query`` is already scaled, as v1 expects."""
    if not (module.relative_attention and rel_embeddings is not None and relative_pos is not None):
        return None
    return module.disentangled_att_bias(query, key, relative_pos, module.pos_dropout(rel_embeddings), factor)


def _position_scores_v2(module, query, key, relative_pos, rel_embeddings, factor):
    """(B, H, Tq, Tk) relative-position scores of v2, or None; v2 scores on (B * H, T, hd) layouts."""
    if not module.relative_attention:
        return None
    batch, heads = query.shape[:2]
    flat = lambda x: x.reshape(batch * heads, x.shape[2], x.shape[3])  # noqa: E731
    score = module.disentangled_attention_bias(
        flat(query), flat(key), relative_pos, module.pos_dropout(rel_embeddings), factor
    )
    return score.view(batch, heads, score.shape[-2], score.shape[-1])


@dataclass(frozen=True)
class Version:
    module_name: str  # transformers.models.<name>.modeling_<name>
    project: object
    position_scores: object
    scale_query_first: (
        bool  # v1 scales the queries before both scores; v2 scales the keys of the content score
    )


V1 = Version("deberta", _project_v1, _position_scores_v1, True)
V2 = Version("deberta_v2", _project_v2, _position_scores_v2, False)


def _attend(
    version: Version,
    module: nn.Module,
    prefix: tuple,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    output_attentions: bool,
    query_states,
    relative_pos,
    rel_embeddings,
):
    query, key, value, factor = version.project(module, hidden_states, query_states)  # (B, H, T, hd)
    batch, _, q_len, _ = query.shape
    prefix_key, prefix_value, *valid = prefix  # (B|1, H, P, hd)
    length = prefix_key.shape[2]
    keys = torch.cat([match_batch(prefix_key, batch).to(key.dtype), key], dim=2)
    values = torch.cat([match_batch(prefix_value, batch).to(value.dtype), value], dim=2)
    scale = _scale(module, query, factor).to(query.dtype)
    if version.scale_query_first:
        query = query / scale
        scores = query @ keys.transpose(-1, -2)
    else:
        scores = query @ (keys.transpose(-1, -2) / scale)
    position = version.position_scores(module, query, key, relative_pos, rel_embeddings, factor)
    if position is not None:
        scores = scores + F.pad(position, (length, 0))  # no position score towards the prefix
    talking = getattr(module, "head_logits_proj", None)
    if talking is not None:
        scores = talking(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    valid = match_batch(valid[0], batch) if valid else None
    mask = widen_mask(attention_mask.bool(), length, q_len, key.shape[2], False, valid, query.device)
    scores = scores.masked_fill(~mask, torch.finfo(query.dtype).min)
    probs = module.dropout(F.softmax(scores, dim=-1))
    weights = getattr(module, "head_weights_proj", None)
    if weights is not None:
        probs = weights(probs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    context = (probs @ values).permute(0, 2, 1, 3).reshape(batch, q_len, -1)  # (B, T, H * hd)
    return context, probs if output_attentions else None


def _door_forward(
    self,
    hidden_states,
    attention_mask,
    output_attentions=False,
    query_states=None,
    relative_pos=None,
    rel_embeddings=None,
):
    """The forward of a prepared ``DisentangledSelfAttention``: the class's own without a prefix, else _attend."""
    site = self.__dict__[SITE_ATTR]
    version = site.door.version
    provider = site.provider()
    call = (hidden_states, attention_mask, output_attentions, query_states, relative_pos, rel_embeddings)
    if provider is not None and provider.capturing:
        _, key, value, _ = version.project(self, hidden_states, query_states)
        provider.capture(site, key, value)
    prefix = provider.prefix_for(site) if provider is not None else None
    if prefix is None:
        return type(self).forward(self, *call)
    return _attend(version, self, prefix, *call)


@dataclass(frozen=True)
class DebertaPath(ArchitecturePath):
    model_type: str
    version: Version
    attention_class = ATTENTION_CLASS
    door_forward = staticmethod(_door_forward)
    installation = ForwardDoorInstallation


DEBERTA_PATHS = (DebertaPath("deberta", V1), DebertaPath("deberta-v2", V2))
