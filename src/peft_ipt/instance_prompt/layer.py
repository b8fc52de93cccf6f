"""The trainable part of one IPT adapter: instance signal -> encoder -> prompt codes -> keys/values or embeddings."""

from __future__ import annotations

import torch
from torch import nn

from ..attention import SiteLayout, input_embeddings
from ..base_config import prompt_width_of
from ..prefix_tuning.layer import PrefixTable, set_tables, slot_width, split_slots
from ..tuner import NO_SOURCE, Prefixes, PromptInputs, PromptModule
from .encoders import ENCODERS, HashedTokenTable, first_source_tokens, generator_linear, zero_linear


class InstancePromptModule(PromptModule):
    instance_wise = True

    def __init__(self, config, layout: SiteLayout, model: nn.Module):
        super().__init__()
        self.config = config
        # input-level prompts change the sequence; hidden-state prompts are built inside the model's forward
        self.supports_mixed_batches = config.injection != "input" and config.instance_source != "hidden"
        P, r = config.prompt_length, config.instance_rank
        hidden = prompt_width_of(model.config)
        # ALBERT and ELECTRA embed tokens narrower than their hidden states (128 against 768) and project them up
        table = input_embeddings(model)
        embedding_dim = getattr(table, "embedding_dim", hidden)
        if config.instance_source == "token_table":
            self.table = HashedTokenTable(config.table_size, r)
            source_dim = r
        else:
            source_dim = embedding_dim if config.instance_source == "embeddings" else hidden
        # instance_phm (IDPG's PHM layers) factorises the generator: the 'mlp' encoder and the heads below
        phm = {"phm": config.instance_phm} if config.instance_phm is not None else {}
        self.encoder = ENCODERS[config.instance_encoder](source_dim, P, r, config.encoder_hidden_size, **phm)
        self.dropout = nn.Dropout(config.prompt_dropout)

        self.task_prefix_length = P if config.injection == "hybrid" else 0
        self.instance_layers = config.resolved_instance_layers(layout)
        self.layer_slots, self._shapes, self._instance_shapes = {}, {}, {}
        self.heads, self.task = nn.ModuleDict(), nn.ModuleDict()
        if config.injection == "input":
            # the prompt enters as input embeddings
            self.to_embedding = generator_linear(r, embedding_dim, config.instance_phm)
            return
        for kind in config.selected_kinds(layout):
            carried = (
                config.selected_layers(kind, layout)
                if config.injection == "hybrid"
                else self.instance_layers[kind]
            )
            self.layer_slots[kind] = {layer: slot for slot, layer in enumerate(carried)}
            # each slot's and each instance layer's (n_kv, key size, value size): they differ across Gemma 4's layers
            self._shapes[kind] = layout.slot_shapes(kind, carried)
            self._instance_shapes[kind] = layout.slot_shapes(kind, self.instance_layers[kind])
            self.heads[kind] = generator_linear(
                r, slot_width(self._instance_shapes[kind]), config.instance_phm
            )
            if config.injection == "hybrid":
                self.task[kind] = PrefixTable(
                    P, slot_width(self._shapes[kind]), hidden, config.task_prefix_hidden_size
                )
                if config.init_weights:
                    # Start as plain P-tuning v2: the instance part grows from zero, as LoRA's B does.
                    zero_linear(self.heads[kind])
        self._last_task: dict | None = None

    def __getstate__(self) -> dict:
        # The last call's task prefix may carry autograd history, which a deepcopy refuses; the copy's next call
        # computes its own (see PromptTuner.__getstate__).
        return {**super().__getstate__(), "_last_task": None}

    # -- the instance signal ----------------------------------------------------------------------------------

    def encode(self, vectors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, n, d) source vectors + (B, n) validity -> (B, P, r) prompt codes."""
        n = self.config.instance_tokens
        # In the prompt module's own dtype: float32 by default, the base model's under autocast_adapter_dtype=False
        # or after model.to(torch.bfloat16); the source may come from a model in another dtype.
        vectors = vectors[:, :n].to(next(p.dtype for p in self.parameters() if p.is_floating_point()))
        return self.dropout(self.encoder(vectors, valid[:, :n]))

    def encode_inputs(self, inputs: PromptInputs) -> torch.Tensor:
        source = inputs.source()
        if source is None:
            raise ValueError(NO_SOURCE)
        index, valid = first_source_tokens(source, self.config.instance_tokens)  # (B, n)
        if self.config.instance_source == "token_table":
            if inputs.input_ids is None:
                raise ValueError(
                    "instance_source='token_table' reads token ids, but the call gave inputs_embeds only; pass "
                    "input_ids, or use instance_source='embeddings'"
                )
            vectors = self.table(torch.gather(inputs.input_ids, 1, index))
        else:
            if self.config.instance_source == "frozen_model":
                states = inputs.frozen_states(
                    self.config.frozen_layers
                )  # (B, T' <= T, d): every source position
            elif inputs.inputs_embeds is not None:
                states = inputs.inputs_embeds
            else:
                states = inputs.embedder(inputs.input_ids)  # what the model itself reads the ids with
            index = index.clamp(max=states.shape[1] - 1)  # invalid entries may point past a cut frozen pass
            vectors = torch.gather(states, 1, index[..., None].expand(-1, -1, states.shape[-1]))
            # Masked positions of the frozen pass may hold anything (NaN where a row sees no key at all).
            vectors = torch.where(valid[..., None], vectors, torch.zeros_like(vectors))
        return self.encode(vectors, valid)

    def input_prompt(self, inputs: PromptInputs) -> torch.Tensor:
        """injection='input': (B, P, hidden) soft tokens."""
        return self.to_embedding(self.encode_inputs(inputs))

    # -- prefixes -------------------------------------------------------------------------------------------

    def set_prefix(self, activations: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """prefix_init for the hybrid task prefix: it starts as the model's keys/values of real words."""
        set_tables(self.task, self.layer_slots, self.config.prompt_length, activations)

    def _task_parts(self) -> dict[str, tuple[list, list]]:
        parts = {}
        for kind, table in self.task.items():
            keys, values = split_slots(table().unsqueeze(0), self._shapes[kind])  # slot: (1, n_kv, P, hd)
            parts[kind] = (list(keys), list(values))
        return parts

    def combine(self, codes: torch.Tensor | None) -> Prefixes:
        """Per kind, per slot (B|1, n_kv, P, hd) keys/values: task part (hybrid) + scaled instance part."""
        task = self._last_task or {}
        out: Prefixes = {}
        keep = self._instance_keep(codes)
        for kind, slots in self.layer_slots.items():
            keys, values = task.get(kind, ([None] * len(slots), [None] * len(slots)))
            keys, values = list(keys), list(values)
            if codes is not None:
                # instance layer j's (B, n_kv, P, hd) key and value
                inst_keys, inst_values = split_slots(self.heads[kind](codes), self._instance_shapes[kind])
                scale = self.config.instance_scale if self.config.injection == "hybrid" else 1.0
                if keep is not None:  # (B, 1, 1, 1): each example's instance part kept (rescaled) or left out
                    scale = scale * keep
                for j, layer in enumerate(self.instance_layers[kind]):
                    slot = slots[layer]
                    keys[slot] = scale * inst_keys[j] + (keys[slot] if keys[slot] is not None else 0)
                    values[slot] = scale * inst_values[j] + (values[slot] if values[slot] is not None else 0)
            out[kind] = (keys, values)
        return out

    def _instance_keep(self, codes: torch.Tensor | None) -> torch.Tensor | None:
        """instance_drop in training: per example, 0 (instance part left out) or 1 / (1 - p); None otherwise."""
        p = self.config.instance_drop
        if codes is None or not p or not self.training:
            return None
        kept = torch.rand(codes.shape[0], 1, 1, 1, device=codes.device) >= p
        return kept.to(codes.dtype) / (1.0 - p)

    def prefixes(self, inputs: PromptInputs) -> Prefixes:
        if self.config.injection == "input":
            return {}
        self._last_task = self._task_parts()
        if self.config.instance_source == "hidden":
            return self.combine(None)  # the instance part arrives when the hidden layer runs
        return self.combine(self.encode_inputs(inputs))
