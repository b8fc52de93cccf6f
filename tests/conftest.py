"""Tiny random transformers models, built in code, for the mechanics tests."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BartConfig,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
    T5Config,
)

import peft_ipt  # noqa: F401  (registers the methods)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()
# The mechanics tests run tiny models, where thread start-up costs more than it saves (about 30x on a loaded
# 2-core machine). Tests on the real bundled models raise it again with the ``all_threads`` fixture: to their
# share of the cores when pytest-xdist runs several workers (``-n``), so the workers never oversubscribe them.
torch.set_num_threads(1)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


@pytest.fixture
def all_threads():
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))
    yield
    torch.set_num_threads(1)


# Test files whose tests start processes of their own (torch.distributed, accelerate launch): tens of seconds each.
SPAWNING_FILES = ("test_distributed.py", "test_accelerate_cli.py")


def pytest_collection_modifyitems(items):
    """The long tests first: pytest-xdist hands tests out in collection order, so the minute-long end-to-end runs
    (marked slow) and the multi-process ones start while the quick tests fill the other workers, instead of one
    running alone at the end of the suite. The order within each kind is kept."""

    def weight(item):
        if item.get_closest_marker("slow") is not None:
            return 0
        return 1 if item.path.name in SPAWNING_FILES else 2

    items.sort(key=weight)


VOCAB = 128
# the sizes of a tiny decoder, for model types built in a test file of their own
TINY_DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

CONFIGS = {
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0
    ),
    "llama": lambda: LlamaConfig(  # grouped-query attention: 4 query heads share 2 key/value heads
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    ),
    "bert": lambda: BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    ),
    "roberta": lambda: RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=130,
        pad_token_id=1,
    ),
    "bart": lambda: BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    ),
    "t5": lambda: T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    ),
}

AUTO = {
    "CAUSAL_LM": transformers.AutoModelForCausalLM,
    "SEQ_2_SEQ_LM": transformers.AutoModelForSeq2SeqLM,
    "SEQ_CLS": transformers.AutoModelForSequenceClassification,
    "TOKEN_CLS": transformers.AutoModelForTokenClassification,
    "QUESTION_ANS": transformers.AutoModelForQuestionAnswering,
    "FEATURE_EXTRACTION": transformers.AutoModel,
}


def tiny_model(arch: str, task: str = "CAUSAL_LM", attn: str = "sdpa", seed: int = 0, **overrides):
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        config.num_labels = 3
    torch.manual_seed(seed)
    model = AUTO[task].from_config(config, attn_implementation=attn)
    return model.eval()


def move_trainable_weights(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Add scale x N(0, 1) noise to every trainable weight: an adapter that, like a trained one, moves the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def token_batch(batch: int = 2, length: int = 7, seed: int = 1, low: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (batch, length), generator=generator)


def lm_labels(ids: torch.Tensor, source: int = 3) -> torch.Tensor:
    """Causal-LM labels whose first ``source`` tokens are the prompt (-100), which an instance prompt reads; IPT
    refuses labels that make every token a target (nothing left to build the prompt from)."""
    labels = ids.clone()
    labels[..., :source] = -100
    return labels


@pytest.fixture
def make_model():
    return tiny_model


# -- a word-level tokenizer for runs that need text (the CLI, pipelines) ------------------------------------

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
WORDS = (
    "the a movie film was very good great fine bad awful poor name food area pub cafe cheap french "
    "riverside centre is in serves : , ."
).split()


def tiny_tokenizer(with_cls: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS: BERT-like ([CLS] x [SEP]) or decoder-like (no specials added)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if with_cls:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    specials = {"cls_token": "[CLS]", "sep_token": "[SEP]"} if with_cls else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>", **specials
    )
