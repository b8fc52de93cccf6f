"""`peft-ipt pretrain-table`: IPT's "pretrained" token table, trained fastText-style on a labelled corpus.

The model is the hashed token table followed by a linear classifier: ids (B, n) -> table (B, n, r) -> mean over
valid tokens (B, r) -> Linear(r, classes). Only the table is kept;
``InstancePromptConfig(instance_source="token_table", table_path=..., freeze_table=...)`` then starts from it.
Tokens come from the target model's tokenizer, so the hashed buckets match the ids the adapter will see.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..assets import BUNDLED_DATASETS, load_bundled_dataset
from ..instance_prompt.encoders import HashedTokenTable, masked_mean
from .experiment import BUNDLED_MODELS, model_path
from .train import CLIError


class FastTextClassifier(nn.Module):
    def __init__(self, table_size: int, rank: int, num_classes: int):
        super().__init__()
        self.table = HashedTokenTable(table_size, rank)
        self.classifier = nn.Linear(rank, num_classes)

    def forward(self, token_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:  # (B, n) -> (B, classes)
        return self.classifier(masked_mean(self.table(token_ids), valid))


def _encode(texts: list[str], tokenizer, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, length) token ids and validity, the first ``length`` tokens of each text as the model sees them."""
    encoded = tokenizer(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"].bool()


@torch.no_grad()
def _accuracy(model: nn.Module, ids: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat(
        [model(i, v).argmax(-1) for i, v in zip(ids.split(1024), valid.split(1024), strict=True)]
    )
    model.train()
    return (predictions == labels).float().mean().item()


def pretrain_table(
    data: str,
    out: str | Path = "table.safetensors",
    table_size: int = 2048,
    rank: int = 32,
    model: str = "minilm",
    instance_tokens: int = 128,
    epochs: int = 5,
    max_examples: int | None = 20000,
    batch_size: int = 64,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> dict[str, float]:
    """Train and save the table; returns validation accuracy of the fastText classifier and the time taken."""
    from transformers import AutoTokenizer

    start = time.time()
    torch.manual_seed(seed)
    if data not in BUNDLED_DATASETS:
        raise CLIError(
            f"--data {data!r} is not a bundled data set; choose one of {', '.join(BUNDLED_DATASETS)}"
        )
    splits = load_bundled_dataset(data, seed=seed)
    if "label" not in splits["train"].column_names:
        raise CLIError(
            f"--data {data!r} is a generation data set; pretrain-table needs a labelled (classification) one"
        )
    train = splits["train"].shuffle(seed=seed)
    if max_examples is not None:
        train = train.select(range(min(max_examples, len(train))))
    tokenizer = AutoTokenizer.from_pretrained(model_path(model))
    ids, valid = _encode(list(train["text"]), tokenizer, instance_tokens)
    labels = torch.tensor(list(train["label"]))
    val_ids, val_valid = _encode(list(splits["validation"]["text"]), tokenizer, instance_tokens)
    val_labels = torch.tensor(list(splits["validation"]["label"]))

    classifier = FastTextClassifier(table_size, rank, splits["train"].features["label"].num_classes)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=learning_rate)
    for epoch in range(epochs):
        order = torch.randperm(len(labels))
        total = 0.0
        for batch in order.split(batch_size):
            loss = F.cross_entropy(classifier(ids[batch], valid[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        accuracy = _accuracy(classifier, val_ids, val_valid, val_labels)
        print(
            f"[peft-ipt] epoch {epoch + 1}/{epochs}: train loss {total / len(labels):.4f}, "
            f"validation accuracy {accuracy:.4f}"
        )

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    classifier.table.save(str(out))
    print(
        f"[peft-ipt] saved the table to {out} ({table_size} x {rank}, tokenizer of "
        f"{BUNDLED_MODELS.get(model, model)}). Use it with method_config: {{instance_source: token_table, "
        f"table_path: {out}, table_size: {table_size}, instance_rank: {rank}, freeze_table: true}} "
        "(or freeze_table: false to fine-tune it)"
    )
    return {"validation_accuracy": accuracy, "seconds": time.time() - start}
