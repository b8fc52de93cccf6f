"""Base models, tokenizers and adapters of an experiment: build for training, reload from an output folder."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .experiment import Experiment


def _auto_class(task_type: str):
    import transformers

    return {
        "SEQ_CLS": transformers.AutoModelForSequenceClassification,
        "CAUSAL_LM": transformers.AutoModelForCausalLM,
        "SEQ_2_SEQ_LM": transformers.AutoModelForSeq2SeqLM,
    }[task_type]


def load_tokenizer(experiment: Experiment):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(experiment.model_path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer of {experiment.model!r} has neither a pad nor an eos token to pad with"
            )
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out (attention 0, label -100) anyway
    return tokenizer


def load_base_model(
    experiment: Experiment, tokenizer, label_names: list[str] | None, folder: str | None = None
) -> nn.Module:
    """The pretrained model with the task head (a new classifier for SEQ_CLS, sized to ``label_names``)."""
    kwargs = {}
    if experiment.task_type == "SEQ_CLS":
        kwargs = {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: i for i, name in enumerate(label_names)},
        }
    model = _auto_class(experiment.task_type).from_pretrained(folder or experiment.model_path, **kwargs)
    if model.config.pad_token_id is None:
        # Decoder-only classifiers find the last real token through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def build_model(experiment: Experiment, tokenizer, label_names: list[str] | None) -> nn.Module:
    """The model to train: the base model wrapped by the method's adapter (or the base itself for ``full``)."""
    import peft

    import peft_ipt  # registers IPT and PrefixTuningV2 with peft

    model = load_base_model(experiment, tokenizer, label_names)
    config = experiment.peft_config()
    if config is None:
        return model
    model = peft.get_peft_model(model, config)
    if experiment.start_from:
        peft_ipt.start_from_prefix(model, experiment.start_from)
    return model


def load_trained(experiment: Experiment, output_dir: Path | str, tokenizer, label_names) -> nn.Module:
    """The trained model of an output folder: ``import peft_ipt``, then ``PeftModel.from_pretrained``."""
    import peft

    import peft_ipt  # noqa: F401  (without it peft cannot read our adapter_config.json)

    if experiment.method == "full":
        return load_base_model(experiment, tokenizer, label_names, folder=str(output_dir)).eval()
    base = load_base_model(experiment, tokenizer, label_names)
    return peft.PeftModel.from_pretrained(base, str(output_dir)).eval()


def parameter_counts(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "all_params": total}
