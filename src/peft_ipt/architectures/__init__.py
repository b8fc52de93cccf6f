"""Architectures whose attention transformers does not route through ``AttentionInterface``: one small path each.

Every path finds the model's attention sites and opens one door into each: a hook that asks the same
:class:`~peft_ipt.attention.PrefixProvider` as the registry path for the site's prefix and puts it in front of the
keys and values. The methods never learn which path runs.

- :mod:`.cache_view`: models that hand each attention call its layer's cache (GPT-J, CodeGen, Bloom, Falcon,
  GPT-Neo, GPT-NeoX-Japanese, MPT, XGLM; RoFormer, RemBERT and Megatron-BERT as encoders and as decoders, TAPAS); the
  door stands a view in for that cache which returns the prefix in front of the cached keys and values.
- :mod:`.deberta`: DeBERTa and DeBERTa-v2, whose disentangled attention adds relative-position scores; a prefix key
  has no position, so it gets the content score only.
- :mod:`.mpnet`: MPNet, whose attention adds a relative-position bias; a prefix key gets none, as in DeBERTa.
- :mod:`.encoder_decoder`: MVP (BART-like), FSMT and LED's decoder, encoder-decoders off the registry; the door stands
  the same cache view in at the encoder's, the decoder's and the cross-attention (LED's Longformer encoder: refused).

A model type whose attention goes through the registry in the installed transformers (GPT-J and CodeGen from 5.24)
takes the registry path instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .cache_view import CACHE_VIEW_PATHS
from .deberta import DEBERTA_PATHS
from .encoder_decoder import ENCODER_DECODER_PATHS
from .mpnet import MPNET_PATHS

ARCHITECTURE_PATHS = (*CACHE_VIEW_PATHS, *DEBERTA_PATHS, *MPNET_PATHS, *ENCODER_DECODER_PATHS)
# Model types the test suite runs on tiny models (tests/conftest.py, tests/test_architectures.py,
# tests/test_composite_models.py, tests/test_hybrid_models.py, tests/test_tokenless_models.py).
TESTED_MODEL_TYPES = (
    "align",
    "bart",
    "bert",
    "big_bird",
    "bigbird_pegasus",
    "bloom",
    "clap",
    "codegen",
    "deberta",
    "deberta-v2",
    "deepseek_v3",
    "doge",
    "encoder-decoder",
    "falcon",
    "fsmt",
    "gemma3",
    "gemma4_text",
    "gpt2",
    "gpt_neo",
    "gpt_neox_japanese",
    "gptj",
    "inkling2_text",
    "jamba",
    "jetmoe",
    "layoutlm",
    "led",
    "lfm2",
    "llama",
    "llava",
    "longcat_flash",
    "longt5",
    "markuplm",
    "megatron-bert",
    "mimo_v2_flash",
    "moss_transcribe_diarize",
    "mpnet",
    "mpt",
    "mvp",
    "pegasus_x",
    "phi4_multimodal",
    "qwen2_vl",
    "qwen3_next",
    "rembert",
    "roberta",
    "roformer",
    "speech_to_text",
    "splinter",
    "t5",
    "tapas",
    "vit",
    "wav2vec2",
    "whisper",
    "xglm",
)


# Model types whose modeling file uses the registry, but not for the attention that reads the text: GIT's text
# layers compute attention themselves (only its image encoder calls the registry), so get_peft_model refuses it.
REFUSED_ON_THE_REGISTRY = ("git",)

# Encoder-decoders whose decoder is on the registry and whose encoder attends outside it (local/global blocks,
# BigBird's attention): served with encoder_prefix=False, which get_peft_model names where it is not set.
ENCODER_OFF_THE_REGISTRY = ("bigbird_pegasus", "longt5", "pegasus_x")
DECODER_ONLY_PATH = "registry (encoder_prefix=False)"

# How a modeling file builds the submodels of a model type made of others.
COMPOSING = ("AutoModel", "AutoModelForCausalLM")


def supported_model_types() -> list[str]:
    """The model types served by a path of their own (besides every model on the attention registry)."""
    return sorted(path.model_type for path in ARCHITECTURE_PATHS)


def model_types_by_path() -> dict[str, str]:
    """Every model type the installed transformers knows, with the path peft-ipt takes into it: ``registry`` where
    its modeling file routes attention through ``ALL_ATTENTION_FUNCTIONS``, the path's module where peft-ipt has
    one of its own, else ``refused``. Read from the modeling files' text, without importing them."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    spec = importlib.util.find_spec("transformers")
    models = Path(spec.submodule_search_locations[0]) / "models"
    own = {path.model_type: type(path).__module__.rpartition(".")[2] for path in ARCHITECTURE_PATHS}
    found = {}
    for model_type in sorted(CONFIG_MAPPING_NAMES):
        module = model_type_to_module_name(model_type)
        modeling = models / module / f"modeling_{module}.py"
        if not modeling.is_file():
            continue  # a configuration without a PyTorch model of its own
        text = modeling.read_text(encoding="utf-8")
        if model_type in REFUSED_ON_THE_REGISTRY:
            found[model_type] = "refused"
        elif "ALL_ATTENTION_FUNCTIONS" in text:
            found[model_type] = DECODER_ONLY_PATH if model_type in ENCODER_OFF_THE_REGISTRY else "registry"
        elif model_type in own:
            found[model_type] = own[model_type]
        elif any(f"{auto}.from_config" in text for auto in COMPOSING):
            # no attention of its own: submodels built from its sub-configs (Llava's language model and vision
            # tower, EncoderDecoderModel's encoder and decoder) take theirs, each by its own path
            found[model_type] = "composite"
        else:
            found[model_type] = "refused"
    return found


def supported_models_table() -> str:
    """`peft-ipt supported-models`: one line per model type, its path and whether the test suite runs it."""
    import transformers

    rows = model_types_by_path()
    lines = [
        f"transformers {transformers.__version__}: {len(rows)} model types",
        "",
        "model type  path  tested",
    ]
    for model_type, path in rows.items():
        lines.append(f"{model_type}  {path}  {'yes' if model_type in TESTED_MODEL_TYPES else '-'}")
    served = sum(path not in ("refused", "composite") for path in rows.values())
    composite = sum(path == "composite" for path in rows.values())
    lines += [
        "",
        f"{served} served, {len(rows) - served - composite} refused with a clear error at get_peft_model, "
        f"{composite} composite: built of submodels, served where their language model (or encoder and decoder) "
        "is, which get_peft_model decides.",
    ]
    return "\n".join(lines)
