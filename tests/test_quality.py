"""Quality on a real model: IPT vs PrefixTuningV2 on the bundled all-MiniLM-L6-v2 + Rotten Tomatoes (marked slow).

Same prompt length (16), same data (2,000 seeded training examples, the fixed 853-example validation split),
same budget (2 epochs, batch 32, AdamW lr 1e-2 with warm-up and linear decay, seed 0). The classifier head
trains alongside, as peft does for SEQ_CLS.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rotten_tomatoes():
    from transformers import AutoTokenizer

    from peft_ipt.assets import bundled_model_path, load_bundled_dataset

    data = load_bundled_dataset("rotten_tomatoes", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path("minilm"))

    def encode(split, n=None):
        rows = data[split] if n is None else data[split].shuffle(seed=0).select(range(n))
        enc = tokenizer(
            list(rows["text"]), truncation=True, max_length=64, padding="max_length", return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"], torch.tensor(list(rows["label"]))

    return encode("train", 2000), encode("validation")


def accuracy_after_training(config, train, validation, epochs=2, batch=32, lr=1e-2) -> float:
    from transformers import AutoModelForSequenceClassification

    from peft_ipt.assets import bundled_model_path

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(bundled_model_path("minilm"), num_labels=2)
    model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = len(train[2])
    steps = epochs * (n // batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps)
    )
    losses = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n)
        for start in range(0, n - batch + 1, batch):
            idx = order[start : start + batch]
            loss = model(input_ids=train[0][idx], attention_mask=train[1][idx], labels=train[2][idx]).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert sum(losses[-10:]) < sum(losses[:10])  # it learned something
    model.eval()
    with torch.no_grad():
        predictions = torch.cat(
            [
                model(
                    input_ids=validation[0][i : i + 128], attention_mask=validation[1][i : i + 128]
                ).logits.argmax(-1)
                for i in range(0, len(validation[2]), 128)
            ]
        )
    return (predictions == validation[2]).float().mean().item()


def test_ipt_beats_chance_widely_and_matches_or_beats_prefix_tuning_v2(rotten_tomatoes, all_threads):
    train, validation = rotten_tomatoes
    ipt = accuracy_after_training(
        InstancePromptConfig(task_type="SEQ_CLS", prompt_length=16), train, validation
    )
    prefix = accuracy_after_training(
        PrefixTuningV2Config(task_type="SEQ_CLS", prefix_length=16, reparameterize=False), train, validation
    )
    print(f"\nRotten Tomatoes validation accuracy: IPT {ipt:.4f}, PrefixTuningV2 {prefix:.4f}")
    assert ipt > 0.65  # chance is 0.5 (balanced classes)
    assert ipt >= prefix
