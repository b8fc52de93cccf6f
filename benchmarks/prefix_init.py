"""A lever the prefix-tuning paper names, measured: does starting the task prefix from real words help on E2E?

Li & Liang initialise the prefix with the frozen model's own keys/values of real words. Here every run is the
shipped E2E config (``configs/e2e_{ipt,prefix_v2}.yaml``: SmolLM2-135M, 60 meaning representations, 1 epoch,
lr 1e-2, seed 42) trained by the CLI's ``train()``, with only ``prefix_init`` (and its text) set:

- ``random``: the default (N(0, 1) task prefix; PrefixTuningV2's through its MLP);
- ``vocab``: keys/values of P random vocabulary tokens;
- ``text``: keys/values of ``TEXT``, a plain instruction for the task.

It also records the loss of the untrained adapter on the first training batch: how far from the base model each
initialisation starts. Usage (about 5 minutes a run on one core)::

    python benchmarks/prefix_init.py                       # both methods x three initialisations
    python benchmarks/prefix_init.py --methods ipt --inits random text

Results: ``benchmarks/results/prefix_init.{json,md}`` (runs merged by method/init, the table rebuilt each time).

``--drift`` trains nothing: for each bundled model as a Rotten Tomatoes classifier (the shipped
``configs/rotten_tomatoes_{prefix_v2,ipt,peft_prefix_tuning}.yaml``, ``model=`` set), it builds each untrained
adapter (the flat prefix, the MLP prefix, IPT at instance scale 0.05, each under each initialisation; peft's
PrefixTuning from its own N(0, 1) start) and compares the states the classifier head reads (the last layer at the
token the head pools: the first on MiniLM, the last real one on SmolLM2) with the bare model's, over the first 16
training reviews: their cosine, and how alike the reviews still look to each other (the mean pairwise cosine). Beside
it, the spread (std) of the model's own attention values at the first, middle and last layer, against the N(0, 1)
that ``prefix_init="random"`` starts a flat prefix at. Results: ``benchmarks/results/prefix_init_drift.{json,md}``
(about 1 min), with the versions it ran under; ``--drift-stem``
names another file, for a run in another environment (peft's PrefixTuning runs the classifiers only under
transformers < 5.24)::

    python benchmarks/prefix_init.py --drift
    python benchmarks/prefix_init.py --drift --drift-stem prefix_init_drift_transformers_5.20
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    RESULTS,
    ROOT,
    ResultsFile,
    library_versions,
    markdown_table,
    train_command,
    train_run,
)

TEXT = "Describe the restaurant in one fluent sentence using every attribute given."
# Each initialisation is set explicitly, whatever the shipped config chooses (e2e_ipt.yaml ships with "text").
INITS = {
    "random": ["method_config.prefix_init=random", "method_config.prefix_init_text=null"],
    "vocab": ["method_config.prefix_init=vocab", "method_config.prefix_init_text=null"],
    "text": ["method_config.prefix_init=text", f"method_config.prefix_init_text={TEXT}"],
}
METHODS = ("ipt", "prefix_v2")
# IPT's runs here were measured at instance scale 1.0, InstancePromptConfig's default until peft-ipt 0.2.0 (0.05 since)
METHOD_OVERRIDES = {"ipt": ["method_config.instance_scale=1.0"]}


def initial_loss(config: Path, overrides: list[str]) -> tuple[float, float]:
    """(base model, untrained adapter) loss on the experiment's first 16 training rows, through the CLI's own
    tokenisation and collator; the base model's is the same model with the adapter disabled."""
    import torch
    from transformers import set_seed

    from peft_ipt.cli.data import collator_for, load_splits, tokenize
    from peft_ipt.cli.experiment import load_experiment
    from peft_ipt.cli.models import build_model, load_tokenizer

    experiment = load_experiment(config, overrides)
    splits = load_splits(experiment)
    tokenizer = load_tokenizer(experiment)
    rows = tokenize(splits.train, tokenizer, experiment)
    batch = collator_for(experiment, tokenizer)([rows[i] for i in range(16)])
    set_seed(experiment.training_settings["seed"])
    model = build_model(experiment, tokenizer, splits.label_names).eval()
    with torch.no_grad():
        adapted = model(**batch).loss.item()
        with model.disable_adapter():
            base = model(**batch).loss.item()
    return base, adapted


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--inits", nargs="+", choices=list(INITS), default=list(INITS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="only rebuild the table from the JSON")
    parser.add_argument(
        "--drift", action="store_true", help="how far each untrained adapter moves the head's input"
    )
    parser.add_argument(
        "--drift-stem",
        default="prefix_init_drift",
        help="--drift's results: benchmarks/results/<stem>.{json,md} (another name for another environment's run)",
    )
    args = parser.parse_args(argv)
    if args.drift:
        drift(args.threads, args.drift_stem)
        return
    results_file = ResultsFile(RESULTS / "prefix_init.json")
    if args.report:
        write_table(results_file.field("runs", {}))
        return
    from peft_ipt.assets import AssetMissingError, bigbench_task_path

    try:  # E2E's BIG-bench file: PyPI no longer serves the sdist it came from
        bigbench_task_path("gem/e2e_nlg")
    except AssetMissingError as error:
        parser.error(str(error))
    import torch

    torch.set_num_threads(args.threads)
    runs = results_file.field("runs", {})
    for method in args.methods:
        config = ROOT / "configs" / f"e2e_{method}.yaml"
        for init in args.inits:
            overrides = ["training.eval_strategy=no", *METHOD_OVERRIDES.get(method, []), *INITS[init]]
            base_loss, start_loss = initial_loss(config, overrides)
            results = train_run(config, overrides)
            runs[f"{method}/{init}"] = {
                "method": method,
                "init": init,
                "command": train_command(config, overrides),
                "base_loss": base_loss,
                "initial_loss": start_loss,
                "last_logged_train_loss": results["train_history"][-1].get("loss"),
                "validation": {
                    k: v for k, v in results["validation_history"][-1].items() if "bleu" in k or "rouge" in k
                },
                "test": {k: v for k, v in results["test"].items() if "bleu" in k or "rouge" in k},
            }
            results_file.write({"runs": runs})
            write_table(runs)


# --drift: the classification adapters compared, each an experiment file with overrides
DRIFT_MODELS = ("minilm", "smollm2")
DRIFT_INITS = ("random", "vocab")
PEFT_OWN_INIT = "peft's own"  # peft's built-ins have no prefix_init: their embedding tables start at N(0, 1)
DRIFT_ADAPTERS = {  # label: (config family, overrides, the starts compared)
    "flat prefix": ("prefix_v2", ["method_config.reparameterize=false"], DRIFT_INITS),
    "MLP prefix": ("prefix_v2", ["method_config.reparameterize=true"], DRIFT_INITS),
    "IPT (scale 0.05)": ("ipt", ["method_config.instance_scale=0.05"], DRIFT_INITS),
    "peft PrefixTuning": ("peft_prefix_tuning", [], (PEFT_OWN_INIT,)),
}


def head_states(model, batch, decoder: bool):
    """(rows, hidden) last-layer states at the position the classifier head reads, and every attention layer's
    value-projection output (the values the prefix's own sit beside), collected by forward hooks."""
    import torch

    values = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out: values.append(out.detach()))
        for name, module in model.named_modules()
        if name.endswith((".v_proj", ".attention.self.value"))
    ]
    try:
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    last = out.hidden_states[-1]
    index = batch["attention_mask"].sum(1) - 1 if decoder else torch.zeros(len(last), dtype=torch.long)
    return last[torch.arange(len(last)), index], values


def drift(threads: int, stem: str) -> None:
    import torch
    from transformers import set_seed

    from peft_ipt.cli.data import collator_for, load_splits, tokenize
    from peft_ipt.cli.experiment import load_experiment
    from peft_ipt.cli.models import build_model, load_tokenizer

    torch.set_num_threads(threads)
    cosine = torch.nn.functional.cosine_similarity

    def pairwise(states):  # mean cosine between different reviews' states
        sims = cosine(states[:, None], states[None], dim=-1)
        return sims[~torch.eye(len(states), dtype=torch.bool)].mean().item()

    rows, models, refused = [], {}, []
    for model_name in DRIFT_MODELS:
        for label, (family, overrides, inits) in DRIFT_ADAPTERS.items():
            for init in inits:
                config = ROOT / "configs" / f"rotten_tomatoes_{family}.yaml"
                start = [] if init == PEFT_OWN_INIT else [f"method_config.prefix_init={init}"]
                experiment = load_experiment(config, [f"model={model_name}", *overrides, *start])
                splits = load_splits(experiment)
                tokenizer = load_tokenizer(experiment)
                tokenized = tokenize(splits.train, tokenizer, experiment)
                batch = collator_for(experiment, tokenizer)([tokenized[i] for i in range(16)])
                batch.pop("labels", None)
                set_seed(experiment.training_settings["seed"])
                model = build_model(experiment, tokenizer, splits.label_names).eval()
                decoder = not model.config.is_encoder_decoder and model.config.model_type != "bert"
                try:
                    adapted, _ = head_states(model, batch, decoder)
                # peft's PrefixTuning refuses classifiers from transformers 5.24 on
                except ValueError as error:
                    if init != PEFT_OWN_INIT:  # ours must run: never recorded as a refusal
                        raise
                    refused.append(f"{label} on {model_name}: cannot run (peft: {error})")
                    continue
                if init == PEFT_OWN_INIT:  # peft's disable_adapter() raises on a prompt-learning classifier
                    bare, values = head_states(model.get_base_model(), batch, decoder)
                else:
                    with model.disable_adapter():
                        bare, values = head_states(model, batch, decoder)
                to_bare = cosine(adapted, bare)
                models[model_name] = {
                    "value_std": {
                        "first layer": values[0].std().item(),
                        "middle layer": values[len(values) // 2].std().item(),
                        "last layer": values[-1].std().item(),
                    },
                    "bare_pairwise_cosine": pairwise(bare),
                }
                rows.append(
                    {
                        "model": model_name,
                        "adapter": label,
                        "prefix_init": init,
                        "cosine_to_bare_mean": to_bare.mean().item(),
                        "cosine_to_bare_min": to_bare.min().item(),
                        "pairwise_cosine": pairwise(adapted),
                    }
                )
                print(rows[-1], flush=True)
    versions = library_versions()
    ResultsFile(RESULTS / f"{stem}.json").write(
        {"versions": versions, "models": models, "rows": rows, "refused": refused}
    )
    lines = [
        "# How far each untrained adapter moves what the classifier head reads (Rotten Tomatoes, 16 reviews)",
        "",
        "`python benchmarks/prefix_init.py --drift`. Cosine between the last layer's state at the head's token with",
        "the adapter and without it (1: the adapter starts as the bare model); pairwise: the mean cosine between",
        "different reviews' states (the bare model's in the second table). Under "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
        + ".",
        "",
    ]
    table = [
        [
            r["model"],
            r["adapter"],
            r["prefix_init"],
            f"{r['cosine_to_bare_mean']:.2f}",
            f"{r['cosine_to_bare_min']:.2f}",
            f"{r['pairwise_cosine']:.2f}",
        ]
        for r in rows
    ]
    header = ["model", "adapter", "prefix_init", "cosine to bare (mean)", "(min)", "pairwise cosine"]
    own = [
        [name, *(f"{v:.3f}" for v in m["value_std"].values()), f"{m['bare_pairwise_cosine']:.2f}"]
        for name, m in models.items()
    ]
    own_header = ["model", "value std, first layer", "middle layer", "last layer", "bare pairwise cosine"]
    markdown = "\n".join(
        [
            *lines,
            markdown_table(header, table),
            "",
            *refused,
            *([""] if refused else []),
            markdown_table(own_header, own),
        ]
    )
    (RESULTS / f"{stem}.md").write_text(markdown + "\n")
    print(markdown)


def write_table(runs: dict) -> None:
    lines = [
        "# Real-word initialisation of the task prefix on E2E (SmolLM2-135M, shipped E2E configs)",
        "",
        f'`python benchmarks/prefix_init.py`; text init: "{TEXT}".',
        "",
        "Losses: the first 16 training rows, before training. Scores: sacrebleu BLEU and rouge-score ROUGE-L "
        "(0-100) of greedy outputs against all references of each of the 21 test inputs.",
        "",
    ]
    table = []
    for run in runs.values():
        test = run["test"]
        bleu = next((v for k, v in test.items() if k.endswith("bleu")), float("nan"))
        rouge = next((v for k, v in test.items() if "rouge" in k), float("nan"))
        table.append(
            [
                run["method"],
                run["init"],
                f"{run['base_loss']:.2f}",
                f"{run['initial_loss']:.2f}",
                f"{bleu:.1f}",
                f"{rouge:.1f}",
            ]
        )
    header = [
        "method",
        "prefix_init",
        "loss: base model",
        "loss: untrained adapter",
        "test BLEU",
        "test ROUGE-L",
    ]
    markdown = "\n".join(lines) + "\n" + markdown_table(header, table)
    (RESULTS / "prefix_init.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
