"""The model card ``save_pretrained`` writes beside an adapter: the method, its key config fields, and the lines that
load it (``import peft_ipt`` first).

Written by our configs' ``save_pretrained``, which peft calls right after its own ``create_or_update_model_card``
has written its template: the template's text is replaced, its Hub metadata (library, tags, base model, pipeline)
kept as peft wrote it. A README.md that someone wrote by hand is kept whole: only peft's empty template or a card of
ours is replaced.
"""

from __future__ import annotations

import os
from pathlib import Path

MARKER = "<!-- model card written by peft-ipt's save_pretrained; replaced on the next save unless you remove this line -->"
PEFT_TEMPLATE_SIGN = "[More Information Needed]"
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
}


def _value(value) -> str:
    return "all" if value is None else f"`{value}`"


def adapter_card(config, location: str) -> str:
    """The card text of one adapter saved at ``location`` (a folder, or the Hub repo it is pushed to)."""
    task = str(getattr(config.task_type, "value", config.task_type) or "")
    base = config.base_model_name_or_path or "BASE_MODEL"
    auto = AUTO_CLASSES.get(task, "AutoPeftModel")
    rows = [
        ("peft type", f"`{config.peft_type.name}`"),
        ("task type", f"`{task or 'none'}`"),
        ("base model", f"`{base}`"),
    ]
    rows += [(name, _value(getattr(config, name))) for name in config.card_fields]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""{MARKER}

# {config.card_title} adapter for {base}

A [peft](https://github.com/huggingface/peft) adapter of [peft-ipt](https://pypi.org/project/peft-ipt/):
{config.card_summary}.

| field | value |
|---|---|
{table}

The whole configuration is in `adapter_config.json`.

## Loading

`import peft_ipt` registers the method with peft; without it peft cannot read this adapter's config.

```python
import peft_ipt  # before loading
from peft import {auto}

model = {auto}.from_pretrained("{location}")
```
"""


def write_adapter_card(config, save_directory: str | os.PathLike) -> None:
    import peft
    from huggingface_hub import ModelCard

    from ._version import __version__

    path = Path(save_directory) / "README.md"
    metadata = ""
    if path.is_file():
        existing = path.read_text(encoding="utf-8")
        if MARKER not in existing and PEFT_TEMPLATE_SIGN not in existing:
            return  # a card someone wrote: theirs to keep
        data = ModelCard.load(path).data.to_yaml()
        metadata = f"---\n{data}\n---\n" if data.strip() else ""
    versions = f"\n### Framework versions\n\n- PEFT {peft.__version__}\n- peft-ipt {__version__}\n"
    path.write_text(metadata + adapter_card(config, str(save_directory)) + versions, encoding="utf-8")
