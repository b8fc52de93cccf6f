"""What outlives one call of a model with an instance prompt, and finds that call's prompt again later.

A key/value cache and an encoder's outputs carry the prompt they were computed with (``CachePrompt``), so a call
that continues them uses it, not whichever call ran last. Each training call keeps its inputs, random state and
prompt (``CallState``), so gradient checkpointing, which recomputes a layer in backward, possibly after other calls,
recomputes it with the prompt of the call that ran it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .tuner import PromptInputs, SitePrefixes


def cache_argument(kwargs: dict):
    """A call's key/value cache: ``cache`` from transformers 5.24 on, ``past_key_values`` before (and, deprecated,
    still accepted by 5.24's forward, which renames it only inside)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


# The attribute a key/value cache carries its instance prompt in: a call that continues the cache must use the
# prompt the cache's keys and values were computed with, not whichever call of the model came last.
CACHE_PROMPT = "_peft_ipt_prompt"


@dataclass
class CachePrompt:
    """The instance prompt a key/value cache was filled with, and the adapters (or per-row adapters) it belongs to."""

    adapters: tuple
    prefixes: SitePrefixes
    inserted: torch.Tensor | None = None  # an input-level prompt (its P positions are in the cache too)

    def same_as(self, prefixes: SitePrefixes | None, inserted: torch.Tensor | None) -> bool:
        """Whether another call's prompt is this one (up to float noise: the same source, other padding)."""

        def same(a, b) -> bool:
            if a is None or b is None:
                return a is None and b is None
            return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)

        prefixes = prefixes or {}
        if set(self.prefixes) != set(prefixes) or not same(self.inserted, inserted):
            return False
        for site, entry in self.prefixes.items():
            other = prefixes[site]
            if entry is None or other is None:
                if entry is not other:
                    return False
            elif len(entry) != len(other) or not all(same(a, b) for a, b in zip(entry, other, strict=True)):
                return False
        return True


@dataclass(eq=False)
class CallState:
    """One call's prompt, as gradient checkpointing's recomputation in backward needs it: several training calls may
    run before one backward (a contrastive loss, TRL's KTO), so each recomputed layer must get its own call's."""

    inputs: PromptInputs
    rng: tuple | None  # the random state the prompts were computed from (None: computed without gradient)
    row_adapters: list[str] | None
    prefixes: SitePrefixes | None = None
    reentrant_sites: set = field(default_factory=set)  # sites whose layer ran under reentrant checkpointing


def checkpoint_units(model: nn.Module, attentions: list[nn.Module]) -> dict[int, nn.Module]:
    """The layers gradient checkpointing recomputes, by the id of the attention module in each: of each attention
    module, the outermost ancestor that is an element of a ModuleList (a decoder layer, T5's block)."""
    parents = {}
    for module in model.modules():
        for child in module.children():
            parents[child] = module
    units = {}
    for attention in attentions:
        unit, node = None, attention
        while node in parents:
            if isinstance(parents[node], nn.ModuleList):
                unit = node  # keep climbing: the outermost such ancestor is the checkpointed layer
            node = parents[node]
        if unit is not None:
            units[id(attention)] = unit
    return units


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    first = next((a for a in args if torch.is_tensor(a)), None)
    return first if first is not None else kwargs.get("hidden_states")


def drafting(generate_kwargs: dict) -> bool:
    """Whether generate() runs as the assistant of transformers' assisted generation (it marks the config so)."""
    return bool(getattr(generate_kwargs.get("generation_config"), "is_assistant", False))


def cache_of_output(output):
    if isinstance(output, tuple) and not hasattr(output, "keys"):  # return_dict=False: (logits, cache, ...)
        return next((item for item in output if hasattr(item, "get_seq_length")), None)
    declared = getattr(output, "__dataclass_fields__", None)
    for name in ("cache", "past_key_values"):  # transformers 5.25 names it cache
        if declared is not None and name not in declared:
            # From 5.25 a ModelOutput answers the old name through a property that logs a deprecation the caller
            # did not cause; an output class declares the one it has.
            continue
        cache = getattr(output, name, None)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return cache
    return None
