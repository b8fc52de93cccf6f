"""Instance signal and instance encoders of IPT (Jiang et al. 2022) and its neighbours (IDPG, LPT).

Shapes: B batch, T tokens, n = instance_tokens, d source width, P prompt_length, r instance_rank.
Every encoder maps source vectors (B, n, d) with a validity mask (B, n) to prompt codes (B, P, r); padding and
target tokens are never valid, so they never reach a pooled representation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

# Knuth's multiplicative hash spreads consecutive token ids over the buckets.
_HASH_MULTIPLIER = 2654435761


def first_source_tokens(source: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the first ``n`` source tokens of each row, wherever padding puts them.

    source: (B, T) bool. Returns (index (B, n) long, valid (B, n) bool); rows with fewer than n source tokens are
    padded with invalid entries.
    """
    batch, length = source.shape
    # stable sort of "is not source" puts each row's source positions first, in order
    order = torch.sort((~source).to(torch.int8), dim=1, stable=True).indices
    index = order[:, : min(n, length)]
    valid = torch.gather(source, 1, index)
    if index.shape[1] < n:
        pad = n - index.shape[1]
        index = F.pad(index, (0, pad))
        valid = F.pad(valid, (0, pad), value=False)
    return index, valid


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, n, d), (B, n) -> (B, d); an all-invalid row gives zeros."""
    weights = valid.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class HashedTokenTable(nn.Module):
    """IPT's re-embedding table, hashed: token id -> one of ``buckets`` trainable vectors of size ``dim``.

    A full vocabulary x hidden table (50k x 1024 in the paper) would dwarf every other trainable part; hashing
    into a few thousand buckets keeps the table near 1% of a small model and works for any vocabulary.
    """

    embedding_table = True  # a lookup, not compute: num_parameters(exclude_embeddings=True) leaves it out

    def __init__(self, buckets: int, dim: int):
        super().__init__()
        self.buckets = buckets
        self.weight = nn.Parameter(torch.randn(buckets, dim) * dim**-0.5)

    def bucket(self, token_ids: torch.Tensor) -> torch.Tensor:
        return (token_ids.long() * _HASH_MULTIPLIER) % self.buckets

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:  # (B, n) -> (B, n, dim)
        return F.embedding(self.bucket(token_ids), self.weight)

    def save(self, path: str) -> None:
        save_file(
            {"weight": self.weight.detach().cpu().contiguous()},
            path,
            metadata={"hash": "knuth", "buckets": str(self.buckets)},
        )

    def load(self, path: str) -> None:
        try:
            weight = load_file(path)["weight"]
        except Exception as error:  # noqa: BLE001 - any unreadable file means the same fix
            raise ValueError(f"table_path={path!r} is not a readable safetensors table ({error})") from error
        if weight.shape != self.weight.shape:
            raise ValueError(
                f"table_path={path!r} holds a table of shape {tuple(weight.shape)}, but the config asks for "
                f"{tuple(self.weight.shape)} (table_size, instance_rank); set those fields to match the file"
            )
        with torch.no_grad():
            self.weight.copy_(weight)


class PHMLinear(nn.Module):
    """A Linear(in, out) whose weight is a sum of n Kronecker products (IDPG's parameterised hypercomplex layers).

    W = sum_i A_i (x) B_i, with n rules A_i (n, n) and n factors B_i (out/n, in/n): in * out / n + n^3 weights
    instead of in * out. At n = 1 it is a plain Linear. Initialised so that each entry of W has nn.Linear's
    variance, 1 / (3 in).
    """

    def __init__(self, in_features: int, out_features: int, n: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = in_features**-0.5
        self.rules = nn.Parameter(torch.randn(n, n, n) * n**-0.5)  # (n, n, n): A_i
        self.factors = nn.Parameter(  # (n, out/n, in/n): B_i
            torch.empty(n, out_features // n, in_features // n).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))

    @property
    def weight(self) -> torch.Tensor:  # (out, in): entry [a p + c, b q + d] = sum_i A_i[a, b] B_i[c, d]
        return torch.einsum("iab,icd->acbd", self.rules, self.factors).reshape(
            self.out_features, self.in_features
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def zero_(self) -> None:
        """Output zero for every input (the instance part's start under a task prefix), as a zeroed Linear."""
        with torch.no_grad():
            self.factors.zero_()
            self.bias.zero_()


def generator_linear(in_features: int, out_features: int, phm: int | None) -> nn.Module:
    """One linear layer of the instance generator: nn.Linear, or PHMLinear when instance_phm is set."""
    if phm is None:
        return nn.Linear(in_features, out_features)
    if in_features % phm or out_features % phm:
        common = [n for n in range(2, 33) if not in_features % n and not out_features % n]
        raise ValueError(
            f"instance_phm={phm} must divide the widths of every generator layer it factorises, but one maps "
            f"{in_features} -> {out_features} (n dividing both, up to 32: {common or 'none'}); pick such an n, "
            "set instance_rank / encoder_hidden_size to multiples of it, or leave instance_phm None"
        )
    return PHMLinear(in_features, out_features, phm)


def zero_linear(layer: nn.Module) -> None:
    """Make a generator layer output zero (nn.Linear or PHMLinear)."""
    if isinstance(layer, PHMLinear):
        layer.zero_()
    else:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


class NoEncoder(nn.Module):
    """Random IPT: the first P source vectors are the prompt (projected to rank r)."""

    def __init__(self, dim: int, prompt_length: int, rank: int, hidden: int, phm: int | None = None):
        super().__init__()
        self.prompt_length = prompt_length
        self.proj = generator_linear(dim, rank, phm) if dim != rank else nn.Identity()

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x[:, : self.prompt_length] * valid[:, : self.prompt_length, None].to(x.dtype)
        if x.shape[1] < self.prompt_length:
            x = F.pad(x, (0, 0, 0, self.prompt_length - x.shape[1]))
        return self.proj(x)


class MLPEncoder(nn.Module):
    """Mean-pool -> Linear(d, h) -> tanh -> Linear(h, P * r): a bottleneck generator (IDPG, LPT); with ``phm``,
    both layers are IDPG's PHM layers."""

    def __init__(self, dim: int, prompt_length: int, rank: int, hidden: int, phm: int | None = None):
        super().__init__()
        self.shape = (prompt_length, rank)
        self.net = nn.Sequential(
            generator_linear(dim, hidden, phm), nn.Tanh(), generator_linear(hidden, prompt_length * rank, phm)
        )

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.net(masked_mean(x, valid)).view(x.shape[0], *self.shape)


class CNNEncoder(nn.Module):
    """TextCNN (kernels 3/4/5, max-pool over valid positions) -> Linear(3 * channels, P * r)."""

    def __init__(
        self, dim: int, prompt_length: int, rank: int, hidden: int, kernels: tuple[int, ...] = (3, 4, 5)
    ):
        super().__init__()
        self.shape = (prompt_length, rank)
        self.convs = nn.ModuleList(nn.Conv1d(dim, hidden, k, padding=k // 2) for k in kernels)
        self.out = nn.Linear(hidden * len(kernels), prompt_length * rank)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = (x * valid[..., None].to(x.dtype)).transpose(1, 2)  # (B, d, n)
        pooled = []
        for conv in self.convs:
            h = F.relu(conv(x))[..., : valid.shape[1]]  # (B, c, n)
            h = h.masked_fill(~valid[:, None, :], float("-inf")).amax(-1)
            pooled.append(torch.where(torch.isinf(h), torch.zeros_like(h), h))  # all-invalid rows -> 0
        return self.out(torch.cat(pooled, -1)).view(x.shape[0], *self.shape)


class LSTMEncoder(nn.Module):
    """BiLSTM over the source vectors, mean-pooled over valid positions -> Linear(h, P * r)."""

    def __init__(self, dim: int, prompt_length: int, rank: int, hidden: int):
        super().__init__()
        self.shape = (prompt_length, rank)
        self.lstm = nn.LSTM(dim, max(hidden // 2, 1), batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * max(hidden // 2, 1), prompt_length * rank)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # Valid entries come first in each row (first_source_tokens), so packing by length keeps the backward
        # direction from ever reading padding. The lengths go to the CPU once per call, as packing requires.
        lengths = valid.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        h, _ = self.lstm(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=x.shape[1])
        return self.out(masked_mean(h, valid)).view(x.shape[0], *self.shape)


class MixtureEncoder(nn.Module):
    """A router over K learned prompts: softmax(Linear(d, K)(mean-pooled source)) weights K codes (K, P, r).

    Each input's prompt is a convex mix of K shared prompts (K = encoder_hidden_size), so it can follow what the
    input is about but cannot become a code of its own for every training example, as a free generator can.
    """

    def __init__(self, dim: int, prompt_length: int, rank: int, hidden: int):
        super().__init__()
        self.router = nn.Linear(dim, hidden)
        self.codes = nn.Parameter(torch.randn(hidden, prompt_length, rank) * rank**-0.5)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.router(masked_mean(x, valid)), dim=-1)  # (B, K)
        return torch.einsum("bk,kpr->bpr", weights, self.codes)


class AttentionEncoder(nn.Module):
    """P learned queries attend over the source vectors: each prompt vector reads its own weighted pool of them.

    Mean pooling hands every prompt vector one average of the input, so an input's prompt can only say what its
    words are on average. Here prompt position j scores every valid source token with its own query and takes the
    softmax-weighted mix of their projections (one cross-attention head, as a Perceiver or Q-Former reads its
    input): the paper's Random IPT takes the first P tokens as the prompt, this lets each position choose which
    tokens it carries. ``hidden`` is the query/key width.
    """

    def __init__(self, dim: int, prompt_length: int, rank: int, hidden: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(prompt_length, hidden) * hidden**-0.5)
        self.keys = nn.Linear(dim, hidden, bias=False)
        self.values = nn.Linear(dim, rank)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("ph,bnh->bpn", self.queries, self.keys(x)) * self.queries.shape[-1] ** -0.5
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))  # (B, P, n)
        # an all-invalid row has no token to read: its weights are NaN after the softmax, zero here
        weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
        return torch.einsum("bpn,bnr->bpr", weights, self.values(x))  # (B, P, r)


ENCODERS = {
    "none": NoEncoder,
    "mlp": MLPEncoder,
    "cnn": CNNEncoder,
    "lstm": LSTMEncoder,
    "mixture": MixtureEncoder,
    "attention": AttentionEncoder,
}
