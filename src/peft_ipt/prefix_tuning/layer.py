"""The trainable prefix of PrefixTuningV2: one table of keys/values per attention kind, flat or through an MLP."""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils.import_utils import is_tracing

from ..attention import SiteLayout
from ..tuner import Prefixes, PromptInputs, PromptModule


def slot_width(shapes: list[tuple[int, int, int]]) -> int:
    """Columns of a flat key/value matrix for slots of these (n_kv, key size, value size)."""
    return sum(n_kv * (key_dim + value_dim) for n_kv, key_dim, value_dim in shapes)


def split_slots(flat: torch.Tensor, shapes: list[tuple[int, int, int]]):
    """(B, P, slot_width) -> keys, values: slot i's (B, n_kv_i, P, key size_i) and (B, n_kv_i, P, value size_i).

    A row holds, for each slot in order, its key heads then its value heads. Where every slot has one shape, with
    keys and values of one size, the result is two stacked (L, B, n_kv, P, head_dim) views; otherwise (Gemma 4's
    layers, DeepSeek's latent attention) two lists.
    """
    batch, length = flat.shape[:2]
    if len(set(shapes)) == 1 and shapes[0][1] == shapes[0][2]:
        n_kv, head_dim, _ = shapes[0]
        kv = flat.view(batch, length, len(shapes), 2, n_kv, head_dim).permute(2, 3, 0, 4, 1, 5)
        return kv[:, 0], kv[:, 1]  # (L, 2, B, n_kv, P, hd) -> each (L, B, n_kv, P, hd)
    keys, values = [], []
    widths = [width for n_kv, kd, vd in shapes for width in (n_kv * kd, n_kv * vd)]
    parts = flat.split(widths, dim=-1)
    for i, (n_kv, key_dim, value_dim) in enumerate(shapes):
        keys.append(parts[2 * i].reshape(batch, length, n_kv, key_dim).transpose(1, 2))
        values.append(parts[2 * i + 1].reshape(batch, length, n_kv, value_dim).transpose(1, 2))
    return keys, values


class PrefixTable(nn.Module):
    """All selected layers' keys and values for one attention kind, as a (P, slot_width) matrix (split_slots).

    Flat: that matrix is the parameter. Reparameterised (Li & Liang 2021, section 4.3): an embedding
    (P, d) passed through Linear(d, h) -> tanh -> Linear(h, slot_width).
    """

    def __init__(self, prefix_length: int, width: int, embed_dim: int, hidden: int | None):
        super().__init__()
        self.width = width
        if hidden is None:
            self.weight = nn.Parameter(
                torch.randn(prefix_length, width)
            )  # P-tuning v2: nn.Embedding's N(0, 1)
        else:
            self.embedding = nn.Parameter(torch.randn(prefix_length, embed_dim))
            self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))

    @property
    def reparameterized(self) -> bool:
        return hasattr(self, "mlp")

    def forward(self) -> torch.Tensor:  # (P, width)
        return self.mlp(self.embedding) if self.reparameterized else self.weight

    @torch.no_grad()
    def set_output(self, target: torch.Tensor) -> None:
        """Make forward() return ``target`` (P, width): directly when flat; for the MLP, keep the embedding and
        first layer and solve the last layer by least squares (exact while P <= h + 1)."""
        target = target.to(self.embedding.dtype if self.reparameterized else self.weight.dtype)
        if not self.reparameterized:
            self.weight.copy_(target)
            return
        hidden = self.mlp[1](self.mlp[0](self.embedding))  # (P, h)
        design = torch.cat([hidden, torch.ones_like(hidden[:, :1])], dim=1)  # (P, h + 1)
        solution = torch.linalg.pinv(design.double()) @ target.double()  # (h + 1, width), minimum norm
        self.mlp[2].weight.copy_(solution[:-1].T.to(target.dtype))
        self.mlp[2].bias.copy_(solution[-1].to(target.dtype))


def set_tables(
    tables: nn.ModuleDict,
    layer_slots: dict[str, dict[int, int]],
    length: int,
    activations: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Make every kind's table output recorded keys/values, {(kind, layer): (key, value)} each (1, n_kv, T>=P, hd).

    A table's row p holds, for each of its layers in slot order, the key then the value of position p.
    """
    for kind, table in tables.items():
        per_layer = []
        for layer in layer_slots[kind]:
            key, value = activations[(kind, layer)]  # (1, n_kv, T, key size), (1, n_kv, T, value size)
            for state in (key, value):
                per_layer.append(state[0, :, :length].transpose(0, 1).reshape(length, -1))  # (P, n_kv * size)
        table.set_output(torch.cat(per_layer, dim=1))


class PrefixTuningV2Module(PromptModule):
    def __init__(self, config, layout: SiteLayout, embed_dim: int):
        super().__init__()
        self.prefix_length = self.task_prefix_length = config.prefix_length
        hidden = config.encoder_hidden_size if config.reparameterize else None
        self.tables = nn.ModuleDict()
        self.layer_slots = {}
        # kind -> each slot's (n_kv, key size, value size)
        self._shapes: dict[str, list[tuple[int, int, int]]] = {}
        for kind in config.selected_kinds(layout):
            layers = config.selected_layers(kind, layout)
            self.layer_slots[kind] = {layer: slot for slot, layer in enumerate(layers)}
            self._shapes[kind] = layout.slot_shapes(kind, layers)
            self.tables[kind] = PrefixTable(
                self.prefix_length, slot_width(self._shapes[kind]), embed_dim, hidden
            )
        self.dropout = nn.Dropout(config.prefix_dropout)
        self._cache: tuple[tuple, Prefixes] | None = None

    def __getstate__(self) -> dict:
        # The inference cache is keyed on parameter addresses, which a copy does not share: the copy starts without.
        return {**super().__getstate__(), "_cache": None}

    def _split(self, kind: str, flat: torch.Tensor):
        keys, values = split_slots(flat.unsqueeze(0), self._shapes[kind])  # each slot (1, n_kv, P, head_dim)
        if isinstance(keys, torch.Tensor):
            return keys.contiguous(), values.contiguous()
        return keys, values

    def prefixes(self, inputs: PromptInputs) -> Prefixes:
        # In inference the prefix is a constant: compute the MLP once, until a parameter changes in place. Never
        # while torch.export or torch.compile traces: the parameters are fake tensors there, without addresses, and
        # a prefix computed from them must not reach a later eager call.
        weight = next(self.parameters())
        frozen = not (self.training or torch.is_grad_enabled() or is_tracing(weight))
        version = tuple((p.data_ptr(), p._version) for p in self.parameters()) if frozen else None
        if frozen and self._cache is not None and self._cache[0] == version:
            return self._cache[1]
        out = {kind: self._split(kind, self.dropout(table())) for kind, table in self.tables.items()}
        self._cache = (version, out) if frozen else None
        return out

    # -- initialisation and folding --------------------------------------------------------------------------

    def set_prefix(self, activations: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        set_tables(self.tables, self.layer_slots, self.prefix_length, activations)
        self._cache = None

    @torch.no_grad()
    def fold(self) -> None:
        """Replace every MLP by the flat keys/values it computes: same outputs, no MLP at inference."""
        for kind, table in list(self.tables.items()):
            if table.reparameterized:
                flat = PrefixTable(self.prefix_length, table.width, 0, None).to(table.embedding.device)
                flat.weight.copy_(table())
                flat.weight.requires_grad_(table.embedding.requires_grad)
                self.tables[kind] = flat
        self._cache = None
