"""Property tests: random valid configs run and round-trip; random invalid values raise our own ValueError.

Bounded and derandomised for CI (the whole file in well under a minute). For a deeper local run, raise the
example count: ``PEFT_IPT_FUZZ_EXAMPLES=500 python -m pytest tests/test_fuzz.py``.
Bugs the fuzzer found are fixed; their minimal reproducers stay at the end of the file as regression tests.
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
from conftest import VOCAB, tiny_model, token_batch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model

from peft_ipt import InstancePromptConfig, PrefixTuningV2Config

N_LAYERS = 2  # every tiny model in conftest has 2 layers per stack
DECODER_ONLY = ("gpt2", "llama")
ENCODER_ONLY = ("bert", "roberta")
SEQ2SEQ = ("bart", "t5")
ENCODER_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
ARCH_TASKS = (
    [(arch, task) for arch in DECODER_ONLY for task in ("CAUSAL_LM", *ENCODER_TASKS)]
    + [(arch, task) for arch in ENCODER_ONLY for task in ENCODER_TASKS]
    + [(arch, task) for arch in SEQ2SEQ for task in ("SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")]
)
EXAMPLES = int(os.environ.get("PEFT_IPT_FUZZ_EXAMPLES", "0"))


def bounded(n: int) -> settings:
    return settings(
        max_examples=EXAMPLES or n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


# -- strategies ------------------------------------------------------------------------------------------------

layer_subsets = st.one_of(
    st.none(),
    st.integers(0, N_LAYERS - 1),
    st.lists(st.integers(0, N_LAYERS - 1), min_size=1, max_size=N_LAYERS, unique=True),
)


def as_list(layers) -> list[int]:
    return (
        list(range(N_LAYERS)) if layers is None else [layers] if isinstance(layers, int) else sorted(layers)
    )


@st.composite
def stack_switches(draw, arch: str) -> dict:
    """encoder/decoder/cross switches: any combination but all-off on seq2seq models; off or unset elsewhere."""
    if arch not in SEQ2SEQ:
        return {name: draw(st.sampled_from([None, False])) for name in ("encoder_prefix", "cross_prefix")}
    values = draw(st.tuples(*[st.sampled_from([None, True, False])] * 3).filter(lambda v: v != (False,) * 3))
    return dict(zip(("encoder_prefix", "decoder_prefix", "cross_prefix"), values, strict=True))


@st.composite
def prefix_cases(draw) -> tuple[str, str, str, dict]:
    arch, task = draw(st.sampled_from(ARCH_TASKS))
    fields = {
        "prefix_length": draw(st.integers(1, 8)),
        "reparameterize": draw(st.booleans()),
        "encoder_hidden_size": draw(st.integers(1, 16)),
        "prefix_dropout": draw(st.sampled_from([0.0, 0.1, 0.5])),
        "prefix_init": draw(st.sampled_from(["random", "vocab"])),
        "layers_to_transform": draw(layer_subsets),
        "init_weights": draw(st.booleans()),
        **draw(stack_switches(arch)),
    }
    return arch, task, draw(st.sampled_from(["sdpa", "eager"])), fields


@st.composite
def ipt_cases(draw) -> tuple[str, str, str, dict]:
    arch, task = draw(st.sampled_from(ARCH_TASKS))
    source = draw(st.sampled_from(["token_table", "embeddings", "hidden"]))
    injection = draw(
        st.sampled_from(["prefix", "hybrid"] if source == "hidden" else ["input", "prefix", "hybrid"])
    )
    # A documented refusal (test_instance_prompt): input prompts cannot feed a decoder's SEQ_CLS head.
    assume(not (injection == "input" and task == "SEQ_CLS" and arch in DECODER_ONLY))
    fields = {
        "prompt_length": draw(st.integers(1, 8)),
        "injection": injection,
        "instance_source": source,
        "instance_encoder": draw(st.sampled_from(["none", "mlp", "cnn", "lstm", "attention"])),
        "instance_tokens": draw(st.integers(1, 12)),
        "instance_rank": draw(st.integers(1, 8)),
        "encoder_hidden_size": draw(st.integers(1, 16)),
        "table_size": draw(st.integers(1, 64)),
        "instance_scale": draw(st.floats(-2.0, 2.0)),
        "prompt_dropout": draw(st.sampled_from([0.0, 0.3])),
        "init_weights": draw(st.booleans()),
        **draw(stack_switches(arch)),
    }
    if injection == "hybrid":
        fields["task_prefix_hidden_size"] = draw(st.sampled_from([None, 4]))
        fields["instance_drop"] = draw(st.sampled_from([0.0, 0.5]))
    if injection != "input":
        fields["layers_to_transform"] = draw(layer_subsets)
        selected = as_list(fields["layers_to_transform"])
        hidden_layer = draw(st.sampled_from([None, *range(N_LAYERS)])) if source == "hidden" else None
        fields["hidden_layer"] = hidden_layer
        # Instance layers must carry a prefix and, in the stack the hidden source reads, run after hidden_layer.
        hidden_stack_selected = arch not in SEQ2SEQ or fields["encoder_prefix"] is not False
        first = (N_LAYERS // 2 if hidden_layer is None else hidden_layer) if source == "hidden" else 0
        allowed = [i for i in selected if i >= first or not hidden_stack_selected]
        if allowed and draw(st.booleans()):
            fields["instance_layers"] = draw(st.lists(st.sampled_from(allowed), min_size=1, unique=True))
        # no selected layer of the hidden stack after hidden_layer is an error (test_fixed_hidden_source_...)
        assume(allowed or not hidden_stack_selected)
    return arch, task, draw(st.sampled_from(["sdpa", "eager"])), fields


@st.composite
def model_inputs(draw, arch: str, left_padding: bool = True) -> dict:
    """A random batch: 1-3 rows of 1-9 tokens, each row padded (left or right) by fewer tokens than it has."""
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    left = left_padding and arch in DECODER_ONLY  # encoders pad on the right
    side = draw(st.sampled_from(["left", "right"])) if left else "right"
    pad_id = {"roberta": 1, "bart": 1}.get(arch, 0)
    for row in range(batch):
        pads = draw(st.integers(0, length - 1))
        if pads:
            cut = slice(0, pads) if side == "left" else slice(length - pads, length)
            mask[row, cut], ids[row, cut] = 0, pad_id
    inputs = {"input_ids": ids, "attention_mask": mask}
    if arch in SEQ2SEQ:
        inputs["decoder_input_ids"] = torch.randint(
            3, VOCAB, (batch, draw(st.integers(1, 5))), generator=generator
        )
    return inputs


def main_output(output) -> torch.Tensor:
    for name in ("logits", "start_logits", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    raise AssertionError(f"no main output in {type(output).__name__}")


def check_runs_and_round_trips(arch: str, task: str, attn: str, config, inputs: dict) -> PeftModel:
    base = tiny_model(arch, task, attn=attn)
    with torch.no_grad():
        reference = main_output(base(**inputs))
    model = get_peft_model(base, config).eval()  # new adapter modules start in training mode, as in peft
    with torch.no_grad():
        output = main_output(model(**inputs))
    assert output.shape == reference.shape
    assert torch.isfinite(output).all()
    assert not torch.equal(output, reference)  # the adapter reaches the output
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(tiny_model(arch, task, attn=attn), folder)
    with torch.no_grad():
        assert torch.equal(main_output(loaded(**inputs)), output)
    return model


# -- valid configs ---------------------------------------------------------------------------------------------


@bounded(40)
@given(case=prefix_cases(), data=st.data())
def test_random_valid_prefix_tuning_configs_run_and_round_trip(case, data):
    arch, task, attn, fields = case
    inputs = data.draw(model_inputs(arch), label="inputs")
    check_runs_and_round_trips(arch, task, attn, PrefixTuningV2Config(task_type=task, **fields), inputs)


@bounded(60)
@given(case=ipt_cases(), data=st.data())
def test_random_valid_instance_prompt_configs_run_and_round_trip(case, data):
    arch, task, attn, fields = case
    inputs = data.draw(model_inputs(arch), label="inputs")
    model = check_runs_and_round_trips(
        arch, task, attn, InstancePromptConfig(task_type=task, **fields), inputs
    )
    if fields["injection"] != "input":  # some layer receives the instance prompt
        assert any(model.base_model.prompt_modules["default"].instance_layers.values())


# One output per input token (on seq2seq models the outputs belong to the decoder input instead).
PER_TOKEN = ("CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


@bounded(30)
@given(use_ipt=st.booleans(), data=st.data())
def test_right_padding_leaves_the_outputs_of_real_tokens_unchanged(use_ipt, data):
    """Each padded row gives what the row gives alone: padding never reaches a prefix or an instance prompt."""
    arch, task, attn, fields = data.draw(ipt_cases() if use_ipt else prefix_cases(), label="case")
    inputs = data.draw(model_inputs(arch, left_padding=False), label="inputs")
    lengths = inputs["attention_mask"].sum(1).tolist()
    config = (InstancePromptConfig if use_ipt else PrefixTuningV2Config)(task_type=task, **fields)
    model = get_peft_model(tiny_model(arch, task, attn=attn), config).eval()
    with torch.no_grad():
        together = main_output(model(**inputs))
        for row, n in enumerate(lengths):
            alone = {"input_ids": inputs["input_ids"][row : row + 1, :n]}
            if arch in SEQ2SEQ:
                alone["decoder_input_ids"] = inputs["decoder_input_ids"][row : row + 1]
            expected = main_output(model(**alone))[0]
            got = together[row, :n] if task in PER_TOKEN and arch not in SEQ2SEQ else together[row]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# -- invalid values --------------------------------------------------------------------------------------------

positive_int_bad = st.one_of(st.integers(max_value=0), st.sampled_from([True, 2.0, "4", None, [4]]))
fraction_bad = st.one_of(
    st.floats(min_value=1.0, allow_nan=False),
    st.floats(max_value=-1e-9, allow_nan=False),
    st.sampled_from([math.nan, "0.1", None]),
)
bool_bad = st.sampled_from(["yes", 0, 1, "False", [True]])
layers_bad = st.one_of(
    st.integers(max_value=-1),
    st.integers(N_LAYERS, 50),  # out of range for a 2-layer model
    st.lists(st.integers(N_LAYERS, 50), min_size=1, max_size=3),
    st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
    st.sampled_from([[], "0", [0.5], [True], True, 1.0]),
)


def unknown_string(*allowed: str):
    return st.one_of(st.text(max_size=8), st.integers(), st.none()).filter(lambda v: v not in allowed)


PREFIX_INVALID = {
    "prefix_length": positive_int_bad,
    "encoder_hidden_size": positive_int_bad,
    "prefix_dropout": fraction_bad,
    "prefix_init": unknown_string("random", "text", "vocab"),
    "prefix_init_text": st.text(min_size=1, max_size=8),  # without prefix_init='text'
    "reparameterize": bool_bad,
    "init_weights": bool_bad,
    "layers_to_transform": layers_bad,
    "encoder_prefix": bool_bad,
    "cross_prefix": bool_bad,
}
IPT_INVALID = {
    "prompt_length": positive_int_bad,
    "instance_tokens": positive_int_bad,
    "instance_rank": positive_int_bad,
    "encoder_hidden_size": positive_int_bad,
    "table_size": positive_int_bad,
    "prompt_dropout": fraction_bad,
    "instance_drop": fraction_bad,
    "injection": unknown_string("input", "prefix", "hybrid"),
    "instance_source": unknown_string("token_table", "embeddings", "hidden"),
    "instance_encoder": unknown_string("none", "mlp", "cnn", "lstm"),
    "instance_scale": st.sampled_from(["1", None, [1.0], math.inf, -math.inf, math.nan]),
    "layers_to_transform": layers_bad,
    "instance_layers": layers_bad,
    "hidden_layer": layers_bad.filter(lambda v: not isinstance(v, list)),
    "freeze_table": st.sampled_from(["yes", 1, [True]]),
    "table_path": st.sampled_from(["/nonexistent/table.safetensors", 3]),
    "init_weights": bool_bad,
    "decoder_prefix": bool_bad,
}
# Fields that only mean something next to another setting: the otherwise valid context they are tested in.
IPT_CONTEXT = {
    "hidden_layer": {"instance_source": "hidden", "injection": "prefix"},
    "instance_layers": {"injection": "prefix"},
}


def expect_field_error(field: str, build) -> None:
    """``build`` must raise ValueError naming ``field``; any other exception, or none, is a failure."""
    try:
        build()
    except ValueError as error:
        assert field in str(error), f"the ValueError for {field} does not name it: {error}"
    else:
        raise AssertionError(f"invalid {field} was accepted")


def build_with(config_cls, arch: str, fields: dict):
    task = "SEQ_2_SEQ_LM" if arch in SEQ2SEQ else "CAUSAL_LM"

    def build():
        model = get_peft_model(tiny_model(arch, task), config_cls(task_type=task, **fields))
        ids = token_batch(2, 5)
        with torch.no_grad():
            model(input_ids=ids, **({"decoder_input_ids": ids} if arch in SEQ2SEQ else {}))

    return build


@bounded(60)
@given(field=st.sampled_from(sorted(PREFIX_INVALID)), arch=st.sampled_from(["llama", "bart"]), data=st.data())
def test_invalid_prefix_tuning_values_raise_value_error_naming_the_field(field, arch, data):
    value = data.draw(PREFIX_INVALID[field], label=field)
    expect_field_error(field, build_with(PrefixTuningV2Config, arch, {"prefix_length": 2, field: value}))


@bounded(100)
@given(field=st.sampled_from(sorted(IPT_INVALID)), arch=st.sampled_from(["llama", "bart"]), data=st.data())
def test_invalid_instance_prompt_values_raise_value_error_naming_the_field(field, arch, data):
    value = data.draw(IPT_INVALID[field], label=field)
    fields = {"prompt_length": 2, "instance_tokens": 4, **IPT_CONTEXT.get(field, {}), field: value}
    expect_field_error(field, build_with(InstancePromptConfig, arch, fields))


# -- bugs the fuzzer found, now fixed: their reproducers stay as regression tests ------------------------


@pytest.mark.parametrize("field", ["prefix_length", "encoder_hidden_size"])
def test_fixed_prefix_tuning_int_fields_accept_bools(field):
    with pytest.raises(ValueError, match=field):
        get_peft_model(tiny_model("llama"), PrefixTuningV2Config(task_type="CAUSAL_LM", **{field: True}))


@pytest.mark.parametrize("config_cls", [PrefixTuningV2Config, InstancePromptConfig])
def test_fixed_layers_to_transform_float_raises_type_error(config_cls):
    with pytest.raises(ValueError, match="layers_to_transform"):
        config_cls(task_type="CAUSAL_LM", layers_to_transform=1.0)


@pytest.mark.parametrize("value", [1, -1])
def test_fixed_instance_layers_scalar_raises_type_error(value):
    # 1 should mean [1], as it does for layers_to_transform; -1 should be a ValueError naming the field
    if value < 0:
        with pytest.raises(ValueError, match="instance_layers"):
            InstancePromptConfig(task_type="CAUSAL_LM", injection="prefix", instance_layers=value)
    else:
        config = InstancePromptConfig(task_type="CAUSAL_LM", injection="prefix", instance_layers=value)
        assert config.instance_layers == [value]


@pytest.mark.parametrize(
    "fields",
    [
        {"injection": "prefix", "instance_layers": [True]},
        {"injection": "prefix", "instance_source": "hidden", "hidden_layer": True},
    ],
)
def test_fixed_instance_layer_fields_accept_bools(fields):
    field = "instance_layers" if "instance_layers" in fields else "hidden_layer"
    with pytest.raises(ValueError, match=field):
        InstancePromptConfig(task_type="CAUSAL_LM", **fields)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_fixed_instance_scale_accepts_nan_and_inf(value):
    with pytest.raises(ValueError, match="instance_scale"):
        InstancePromptConfig(task_type="CAUSAL_LM", instance_scale=value)


@pytest.mark.parametrize("injection", ["prefix", "hybrid"])
def test_fixed_hidden_source_with_no_layer_after_hidden_layer_is_accepted(injection):
    # 2 layers: hidden_layer defaults to 1, layers_to_transform keeps only layer 0
    config = InstancePromptConfig(
        task_type="CAUSAL_LM", injection=injection, instance_source="hidden", layers_to_transform=[0]
    )
    with pytest.raises(ValueError, match="hidden_layer"):
        get_peft_model(tiny_model("llama"), config)


def test_fixed_input_injection_trims_seq_cls_logits_when_num_labels_equals_t_plus_p():
    config = InstancePromptConfig(task_type="SEQ_CLS", injection="input", prompt_length=2)
    model = get_peft_model(tiny_model("bert", "SEQ_CLS"), config).eval()  # num_labels=3
    with torch.no_grad():
        logits = model(input_ids=token_batch(1, 1)).logits  # T + P = 1 + 2 = 3
    assert logits.shape == (1, 3)
