"""Which IPT variant wins per parameter: the measurement behind InstancePromptConfig's defaults.

Setting: the bundled all-MiniLM-L6-v2 + Rotten Tomatoes, 2,000 seeded training examples, validation split (853),
max length 64, prompt length 16, 2 epochs, batch 32, AdamW lr 1e-2 (20 warm-up steps, linear decay), seed 0;
the classifier head trains alongside (peft's SEQ_CLS convention). P-tuning v2 (flat PrefixTuningV2) is the
task-level reference.

    python benchmarks/ipt_ablation.py                  # all variants (about 5 min each on 2 cores)
    python benchmarks/ipt_ablation.py --only default   # one variant
    python benchmarks/ipt_ablation.py --seeds 0 1      # mean over seeds
    python benchmarks/ipt_ablation.py --only default_p8 default_p32 instance_prefix_only instance_input_only \
        default_scale_0.05 prefix_v2_mlp             # the papers' levers, one at a time

Each finished variant is merged into benchmarks/results/ipt_ablation.json (by variant name) and the table in
ipt_ablation.md is rebuilt from the whole file, so the variants can be run in pieces.
``--from-log FILE`` merges the JSON row lines an earlier run of this script printed (e.g. an interrupted run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config  # noqa: E402
from peft_ipt.assets import bundled_model_path, load_bundled_dataset  # noqa: E402

RESULTS = Path(__file__).parent / "results"
P = 16
TRAIN_SIZE = 2000
VARIANTS = {
    "prefix_v2_flat": lambda: PrefixTuningV2Config(
        task_type="SEQ_CLS", prefix_length=P, reparameterize=False
    ),
    "default": lambda: InstancePromptConfig(task_type="SEQ_CLS", prompt_length=P),
    "default_vocab_init": lambda: (
        InstancePromptConfig(  # the task prefix starts from real tokens' keys/values
            task_type="SEQ_CLS", prompt_length=P, prefix_init="vocab"
        )
    ),
    "embeddings_first_layer": lambda: InstancePromptConfig(
        task_type="SEQ_CLS", prompt_length=P, instance_layers=[0]
    ),
    "token_table_all_layers": lambda: InstancePromptConfig(
        task_type="SEQ_CLS", prompt_length=P, instance_source="token_table"
    ),
    "token_table_first_layer": lambda: InstancePromptConfig(
        task_type="SEQ_CLS", prompt_length=P, instance_source="token_table", instance_layers=[0]
    ),
    "token_table_cnn_first_layer": lambda: InstancePromptConfig(
        task_type="SEQ_CLS",
        prompt_length=P,
        instance_source="token_table",
        instance_encoder="cnn",
        instance_layers=[0],
    ),
    "hidden_lpt": lambda: InstancePromptConfig(
        task_type="SEQ_CLS", prompt_length=P, instance_source="hidden"
    ),
    # The levers the papers name, each moved alone from the default: prompt length, the injection (hybrid's task
    # prefix dropped, or the prompt at the input only), the paper's small instance scale, and prefix-tuning's MLP
    # reparameterisation as the task-level reference.
    "default_p8": lambda: InstancePromptConfig(task_type="SEQ_CLS", prompt_length=8),
    "default_p32": lambda: InstancePromptConfig(task_type="SEQ_CLS", prompt_length=32),
    "instance_prefix_only": lambda: InstancePromptConfig(
        task_type="SEQ_CLS", prompt_length=P, injection="prefix"
    ),
    "instance_input_only": lambda: InstancePromptConfig(
        task_type="SEQ_CLS", prompt_length=P, injection="input"
    ),
    "default_scale_0.05": lambda: InstancePromptConfig(
        task_type="SEQ_CLS", prompt_length=P, instance_scale=0.05
    ),
    "prefix_v2_mlp": lambda: PrefixTuningV2Config(task_type="SEQ_CLS", prefix_length=P, reparameterize=True),
}


def load_data(train_size: int = TRAIN_SIZE):
    """(train, validation), each (input_ids, attention_mask, labels): the seeded training subset, all validation."""
    data = load_bundled_dataset("rotten_tomatoes", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path("minilm"))
    train = encode(tokenizer, data["train"].shuffle(seed=0).select(range(train_size)))
    return train, encode(tokenizer, data["validation"])


def encode(tokenizer, rows):
    enc = tokenizer(
        list(rows["text"]), truncation=True, max_length=64, padding="max_length", return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"], torch.tensor(list(rows["label"]))


def run(name: str, seed: int, train, validation, epochs: int = 2, batch: int = 32, lr: float = 1e-2) -> dict:
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(bundled_model_path("minilm"), num_labels=2)
    total = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, VARIANTS[name]())
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = len(train[2])
    steps = epochs * (n // batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps)
    )
    start = time.time()
    losses = []
    with tqdm(total=steps, desc=f"{name} seed {seed}", leave=False) as bar:
        for _ in range(epochs):
            model.train()
            order = torch.randperm(n)
            for i in range(0, n - batch + 1, batch):
                idx = order[i : i + batch]
                loss = model(input_ids=train[0][idx], attention_mask=train[1][idx], labels=train[2][idx]).loss
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
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
    accuracy = (predictions == validation[2]).float().mean().item()
    # The classifier head (trained by every method) counts as trainable, as print_trainable_parameters says.
    return {
        "accuracy": accuracy,
        "trainable": trainable,
        "share": trainable / total,
        "seconds": time.time() - start,
        "loss_first_10": statistics.mean(losses[:10]),
        "loss_last_10": statistics.mean(losses[-10:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--skip", nargs="*", default=[], help="variants to leave out of --only")
    parser.add_argument("--from-log", nargs="*", default=[], help="merge rows printed by earlier runs")
    args = parser.parse_args()
    train, validation = load_data()
    path = RESULTS / "ipt_ablation.json"
    RESULTS.mkdir(exist_ok=True)
    for log in args.from_log:
        for line in Path(log).read_text().replace("\r", "\n").splitlines():
            start = line.find('{"variant"')
            if start >= 0:
                save_row(path, json.loads(line[start:]))
    for name in args.only:
        if name in args.skip:
            continue
        runs = [run(name, seed, train, validation) for seed in args.seeds]
        accuracies = [r["accuracy"] for r in runs]
        row = {
            "variant": name,
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_std": statistics.pstdev(accuracies),
            "seeds": args.seeds,
            "trainable": runs[0]["trainable"],
            "share": runs[0]["share"],
            "seconds": statistics.mean(r["seconds"] for r in runs),
        }
        print(json.dumps(row), flush=True)
        save_row(path, row)
    print((RESULTS / "ipt_ablation.md").read_text())


def save_row(path: Path, row: dict) -> None:
    rows = {r["variant"]: r for r in (json.loads(path.read_text()) if path.exists() else [])}
    rows[row["variant"]] = row
    ordered = [rows[name] for name in VARIANTS if name in rows]
    path.write_text(json.dumps(ordered, indent=2))
    table = ["| variant | val. accuracy | trainable | share | s / run |", "|---|---|---|---|---|"]
    for r in ordered:
        table.append(
            f"| {r['variant']} | {100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f} | {r['trainable']:,} "
            f"| {100 * r['share']:.2f}% | {r['seconds']:.0f} |"
        )
    (path.parent / "ipt_ablation.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
