"""The model card (README.md) of a trained adapter: Hub metadata, method, data, results and a usage snippet."""

from __future__ import annotations

import json
from typing import Any

import yaml

from ..assets import BUNDLED_DATASETS
from .experiment import BUNDLED_MODELS, Experiment

# method -> (title, one-line description, Hub tag)
METHOD_INFO = {
    "ipt": (
        "Instance-wise prompt tuning (IPT)",
        "a prompt computed from each input (Jiang et al. 2022), injected as attention prefixes / soft tokens",
        "instance-prompt-tuning",
    ),
    "prefix_v2": (
        "Prefix-tuning v2",
        "trainable keys and values at every attention layer (Li & Liang 2021; P-tuning v2, Liu et al. 2021)",
        "prefix-tuning",
    ),
    "peft_prompt_tuning": (
        "Prompt tuning (peft)",
        "soft tokens in front of the input (Lester et al. 2021)",
        "prompt-tuning",
    ),
    "peft_p_tuning": ("P-tuning (peft)", "soft tokens from a prompt encoder (Liu et al. 2021)", "p-tuning"),
    "peft_prefix_tuning": ("Prefix tuning (peft)", "peft's prefix tuning (Li & Liang 2021)", "prefix-tuning"),
    "lora": ("LoRA (peft)", "low-rank updates of the attention weights (Hu et al. 2021)", "lora"),
    "full": ("Full fine-tuning", "every weight of the model trained", "full-fine-tuning"),
}
OUR_METHODS = ("ipt", "prefix_v2")  # adapters that need `import peft_ipt` to load
PIPELINE_TAGS = {
    "SEQ_CLS": "text-classification",
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
}
METRIC_TAGS = {"accuracy": "accuracy", "macro_f1": "f1", "bleu": "bleu", "rouge_l": "rouge"}
AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}


def base_model_id(experiment: Experiment) -> str:
    return BUNDLED_MODELS.get(experiment.model, experiment.model)


def dataset_id(experiment: Experiment) -> str:
    data = experiment.data
    if data.name:
        return data.name
    return "local:" + ",".join(sorted({path.rsplit("/", 1)[-1] for path in data.files.values()}))


def metadata(experiment: Experiment) -> dict[str, Any]:
    """The YAML header the Hub reads: library, base model, tags, data, metrics, pipeline."""
    task_metrics = ("accuracy", "macro_f1") if experiment.task_type == "SEQ_CLS" else ("bleu", "rouge_l")
    return {
        "library_name": "transformers" if experiment.method == "full" else "peft",
        "base_model": base_model_id(experiment),
        "tags": [
            "peft-ipt",
            experiment.method,
            METHOD_INFO[experiment.method][2],
            PIPELINE_TAGS[experiment.task_type],
        ],
        "datasets": [dataset_id(experiment)],
        "metrics": sorted({METRIC_TAGS[m] for m in task_metrics}),
        "pipeline_tag": PIPELINE_TAGS[experiment.task_type],
    }


def usage_snippet(experiment: Experiment, repo: str, example: str, label_names: list[str] | None) -> str:
    """Python that loads the adapter from ``repo`` and runs it on ``example``."""
    base, auto = base_model_id(experiment), AUTO_CLASSES[experiment.task_type]
    lines = []
    if experiment.method in OUR_METHODS:
        lines.append("import peft_ipt  # registers IPT / PrefixTuningV2 with peft: loading fails without it")
    if experiment.method == "full":
        lines += [
            f"from transformers import {auto}, AutoTokenizer",
            "",
            f"model = {auto}.from_pretrained({repo!r}).eval()",
            f"tokenizer = AutoTokenizer.from_pretrained({repo!r})",
        ]
    else:
        head = f", num_labels={len(label_names)}" if label_names else ""
        lines += [
            "from peft import PeftModel",
            f"from transformers import {auto}, AutoTokenizer",
            "",
            f"base = {auto}.from_pretrained({base!r}{head})",
            f"model = PeftModel.from_pretrained(base, {repo!r}).eval()",
            f"tokenizer = AutoTokenizer.from_pretrained({base!r})",
        ]
    if experiment.task_type == "SEQ_CLS":
        lines += [
            f"labels = {label_names!r}",
            f"inputs = tokenizer({example!r}, return_tensors='pt')",
            "print(labels[model(**inputs).logits.argmax(-1).item()])",
        ]
    else:
        prompt = example + (experiment.data.separator if experiment.task_type == "CAUSAL_LM" else "")
        lines += [
            f"inputs = tokenizer({prompt!r}, return_tensors='pt')",
            f"output = model.generate(**inputs, max_new_tokens={experiment.generation.max_new_tokens}, "
            "do_sample=False)",
        ]
        cut = "[0, inputs['input_ids'].shape[1]:]" if experiment.task_type == "CAUSAL_LM" else "[0]"
        lines.append(f"print(tokenizer.decode(output{cut}, skip_special_tokens=True))")
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> str:
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _data_section(experiment: Experiment, sizes: dict[str, int], label_names: list[str] | None) -> str:
    data = experiment.data
    if data.name in BUNDLED_DATASETS:
        source = f"`{data.name}` (bundled with peft-ipt: `peft_ipt.assets.load_bundled_dataset`)"
    elif data.name:
        source = f"`datasets.load_dataset({data.name!r}, {data.config_name!r})`"
    else:
        source = "local files " + ", ".join(f"`{split}: {path}`" for split, path in data.files.items())
    if experiment.task_type == "SEQ_CLS":
        pair = f" + `{data.text_pair_column}`" if data.text_pair_column else ""
        columns = f"text `{data.text_column}`{pair}, label `{data.label_column}` ({', '.join(label_names)})"
        rows = "rows"
    else:
        target = data.target_column or "references"
        columns = f"input `{data.input_column}`, target `{target}` (every reference of an input)"
        rows = "rows, each a distinct input with all its references"
    return (
        f"Source: {source}; columns: {columns}. Splits used (seed {data.seed}): train {sizes['train']:,}, "
        f"validation {sizes['validation']:,}, test {sizes['test']:,} {rows}. "
        f"Max length {data.max_length} tokens."
    )


def _results_section(experiment: Experiment, results: dict[str, Any]) -> str:
    metric = experiment.metric
    test = _table([("metric", "test")] + [(k, _fmt(v)) for k, v in results["test"].items()])
    history = _table(
        [("step", "epoch", "validation loss", f"validation {metric}")]
        + [
            (
                str(e.get("step")),
                _fmt(e.get("epoch")),
                _fmt(e.get("eval_loss")),
                _fmt(e.get(f"eval_{metric}")),
            )
            for e in results["validation_history"]
        ]
    )
    return (
        f"On the test split ({results['split_sizes']['test']:,} rows; main metric `{metric}`):\n\n{test}\n\n"
        f"Validation during training:\n\n{history}\n\n"
        f"Wall time {results['wall_time_s']:.0f} s (training {results['train_runtime_s']:.0f} s). "
        "`peft-ipt eval <this folder>` reloads the adapter and re-scores the test split."
    )


def _import_note(experiment: Experiment, adapter_config: dict[str, Any] | None) -> str:
    if experiment.method in OUR_METHODS:
        return (
            "`import peft_ipt` must run before loading: it registers the method with peft. Without it peft fails "
            f"with `KeyError: '{_peft_type(adapter_config)}'`."
        )
    if experiment.method == "full":
        return "A full model: transformers alone loads it."
    return "A standard peft adapter: peft alone loads it."


def model_card(
    experiment: Experiment,
    results: dict[str, Any],
    adapter_config: dict[str, Any] | None,
    repo: str,
    example: str,
    label_names: list[str] | None,
) -> str:
    """README.md text. ``results`` is what metrics.json holds; ``repo`` is where users load the adapter from."""
    title, description, _ = METHOD_INFO[experiment.method]
    header = yaml.safe_dump(metadata(experiment), sort_keys=False, allow_unicode=True)
    share = 100 * results["trainable_params"] / results["all_params"]
    method = (
        f"**{title}** (`method: {experiment.method}`): {description}. Task `{experiment.task_type}`; trainable "
        f"parameters: {results['trainable_params']:,} of {results['all_params']:,} ({share:.2f}%)."
    )
    if experiment.start_from:
        method += (
            f"\n\nStarted from the trained PrefixTuningV2 adapter in `{experiment.start_from}` "
            "(`peft_ipt.start_from_prefix`): its prefix and heads, trained further here."
        )
    if adapter_config:
        config = json.dumps(adapter_config, indent=2, sort_keys=True)
        method += f"\n\nAdapter config (`adapter_config.json`):\n\n```json\n{config}\n```"
    training = yaml.safe_dump({"training": results["training_arguments"]}, sort_keys=True)
    parts = [
        f"---\n{header}---",
        f"# {title}: {base_model_id(experiment)} on {dataset_id(experiment)}",
        experiment.description,
        f"Trained with peft-ipt (`peft-ipt train {experiment.source}`); `experiment.yaml` in this folder is the "
        "resolved experiment: `peft-ipt train experiment.yaml` repeats the run.",
        "## Method",
        method,
        "## Data",
        _data_section(experiment, results["split_sizes"], label_names),
        "## Results",
        _results_section(experiment, results),
        "## Training",
        f"```yaml\n{training}```",
        "## Usage",
        f"```python\n{usage_snippet(experiment, repo, example, label_names)}\n```",
        _import_note(experiment, adapter_config),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def _peft_type(adapter_config: dict[str, Any] | None) -> str:
    return str((adapter_config or {}).get("peft_type", "INSTANCE_PROMPT (needs: import peft_ipt)"))
