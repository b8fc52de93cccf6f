"""InstancePromptModel: the peft tuner for InstancePromptConfig.

Beyond the shared tuner it does two things, each only for the variant that needs it:
- instance_source='hidden': a forward pre-hook on the attention module of ``hidden_layer`` reads the hidden
  states entering it and adds the instance prompt to the prefixes of that layer and the ones after it;
- injection='input': the prompt enters as P soft tokens (after [CLS] for encoders, in front otherwise); labels,
  masks and answer positions are shifted to match, and per-token outputs are trimmed back to the input's length.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..attention import SiteLayout
from ..call_state import CachePrompt, cache_argument, drafting
from ..tuner import (
    ENCODER_CALL,
    TOKEN_INPUT_FILLS,
    PromptInputs,
    PromptTuner,
    gradient_checkpointing_on,
    in_backward,
)
from .config import InstancePromptConfig
from .encoders import first_source_tokens
from .layer import InstancePromptModule

PER_TOKEN_OUTPUTS = ("logits", "start_logits", "end_logits", "last_hidden_state")
# On the outputs of an encoder called alone (injection='input'): (its states with the prompt's positions, the new
# positions of the caller's tokens), for a decoder call on those outputs
ENCODER_PROMPT_STATES = "_peft_ipt_encoder_prompt_states"
# Models that read no tokens and whose encoder attends over all of its input, padding included, whatever
# attention_mask says (Whisper documents that it ignores it): the hidden source pools every frame, as they read them.
READS_ITS_PADDING = frozenset({"whisper"})


def first_present(mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """(B,) the column of each row's first token that is not padding (0 without a mask, or for an empty row)."""
    batch, length = tokens.shape[:2]
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=tokens.device)
    present = mask[:, -length:].bool()
    return torch.where(present.any(1), present.long().argmax(1), 0)


def insertion_order(at: torch.Tensor, length: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where P prompt tokens go into rows of ``length`` tokens, before column ``at`` (B,) of each row.

    Returns ``order`` (B, length + P): for each new position, its index into [the row's tokens, the prompt] (the
    prompt's k-th token is index length + k); and ``kept`` (B, length): the new positions of the row's tokens.
    """
    at = at[:, None]
    new = torch.arange(length + P, device=at.device)[None]
    order = torch.where(new < at, new, torch.where(new < at + P, length + new - at, new - P))
    old = torch.arange(length, device=at.device)[None]
    kept = torch.where(old < at, old, old + P)
    return order, kept


def widen_mask(mask: torch.Tensor, kept: torch.Tensor, P: int) -> torch.Tensor:
    """A (B, T) mask over the caller's tokens, at their ``kept`` positions of T + P: the prompt's columns set."""
    return mask.new_ones(mask.shape[0], mask.shape[1] + P).scatter(1, kept.to(mask.device), mask)


def keep_positions(tensor: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The row's own positions of a per-token output (B', length + P, ...), the prompt's cut out; B' may be a
    multiple of B (generate's beams and returned sequences)."""
    kept = kept.to(tensor.device)
    if tensor.shape[0] != kept.shape[0]:
        kept = kept.repeat_interleave(tensor.shape[0] // kept.shape[0], dim=0)
    index = kept.view(*kept.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
    return torch.gather(tensor, 1, index)


# A module that reads token ids inside the model (DeepSeek-V4's hash-routed experts: a token id -> expert table), so
# the model needs input_ids and cannot run from inputs_embeds.
TOKEN_ROUTING = "tid2eid"


def _reentrant_refusal() -> ValueError:
    return ValueError(
        "instance_source='hidden' cannot train under reentrant gradient checkpointing: the prompt built at "
        "hidden_layer feeds the later layers across checkpoint boundaries, which reentrant recomputation "
        "cannot differentiate. Use gradient_checkpointing_kwargs={'use_reentrant': False}, or another "
        "instance_source."
    )


class InstancePromptModel(PromptTuner):
    prefix = "ipt_"
    modules_attr = "ipt_encoder"

    def _pre_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        super()._pre_injection_hook(model, config, adapter_name)
        self._hidden_hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        # (the row's tokens' new positions (B, T), P, T, return a tuple) of the call that inserted an input prompt
        # (kept, P, length, as_tuple, logits_to_keep): see _with_input_prompt and _finish_call
        self._trim: tuple[torch.Tensor, int, int, bool, torch.Tensor | None] | None = None
        self._kept: torch.Tensor | None = None  # the same positions, for generate()'s hidden states
        self._generated: tuple | None = None  # set by _generate_call for _finish_generate
        self._encoder_only = (
            not getattr(model.config, "is_encoder_decoder", False) and not self._injection.causal
        )
        self._sites = {(kind, layer): module for module, kind, layer, *_ in self._injection.sites}

    def build_prompt_module(self, config: InstancePromptConfig, layout: SiteLayout, model: nn.Module):
        if config.injection == "input" and config.task_type == "SEQ_CLS" and not self._encoder_only:
            kind = "an encoder-decoder" if getattr(model.config, "is_encoder_decoder", False) else "a decoder"
            raise ValueError(
                f"injection='input' with SEQ_CLS on {kind} model: transformers finds the token to classify (the last "
                "one, or the last end-of-sequence token) from input_ids, which input-level prompts replace by "
                "embeddings. Use injection='hybrid' or 'prefix'."
            )
        routed = next((type(m).__name__ for m in model.modules() if hasattr(m, TOKEN_ROUTING)), None)
        if config.injection == "input" and routed is not None:
            raise ValueError(
                f"injection='input' on {type(model).__name__}: its {routed} routes each token to experts by its id "
                "(hash routing), so the model cannot run from the inputs_embeds an input-level prompt hands it. Use "
                "injection='hybrid' or 'prefix'."
            )
        if self._injection.multimodal and (
            config.injection == "input" or config.instance_source == "frozen_model"
        ):
            field, value, why = (
                (
                    "injection",
                    "input",
                    "the model places its image (or audio) features by the positions of input_ids",
                )
                if config.injection == "input"
                else (
                    "instance_source",
                    "frozen_model",
                    "its frozen pass would read the text without the image",
                )
            )
            raise ValueError(
                f"{field}={value!r} on a multimodal model ({type(model).__name__}): {why}. Use injection='hybrid' or "
                "'prefix' with instance_source='embeddings', 'token_table' or 'hidden' (the hidden states the "
                "language model computes, image features included)."
            )
        table_inputs = {"numeric_values", "table_mask"} & set(inspect.signature(model.forward).parameters)
        if config.injection == "input" and table_inputs:
            raise ValueError(
                f"injection='input' on {type(model).__name__}: its per-token table inputs ({', '.join(sorted(table_inputs))}"
                ", and labels that mark answer cells with 0/1, where -100 is no ignore index) have no value for "
                "inserted prompt positions. Use injection='hybrid' or 'prefix'."
            )
        reads = getattr(model, "main_input_name", "input_ids")
        # Whisper's forward names decoder_input_ids only; Wav2Vec2's and ViT's no ids at all
        tokenless = "input_ids" not in inspect.signature(model.forward).parameters
        if tokenless and (config.instance_source != "hidden" or config.injection == "input"):
            field, value, why = (
                ("injection", "input", "the prompt enters as tokens among input_ids")
                if config.injection == "input"
                else (
                    "instance_source",
                    config.instance_source,
                    "that source builds the prompt from input_ids",
                )
            )
            raise ValueError(
                f"{field}={value!r} on {type(model).__name__}, which reads {reads}, not input_ids: {why}. "
                "Use instance_source='hidden' with injection='prefix' or 'hybrid': the prompt is then built from "
                "the hidden states the encoder computes from its input."
            )
        module = InstancePromptModule(config, layout, model)
        if config.table_path and not module.table.weight.is_meta:  # meta: an adapter file fills it
            module.table.load(config.table_path)
        if config.freeze_table:
            module.table.weight.requires_grad_(False)
        return module

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, **kwargs)
        config = self.peft_config[adapter_name]
        if config.instance_source == "hidden":
            attention = self._sites[config.hidden_source(self.layout)]
            self._hidden_hooks[adapter_name] = attention.register_forward_pre_hook(
                self._hidden_states_hook, with_kwargs=True
            )

    def _keep_frozen_parts(self) -> None:
        for name, module in self.prompt_modules.items():
            if self.peft_config.get(name) is not None and self.peft_config[name].freeze_table:
                module.table.weight.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        handle = self._hidden_hooks.pop(adapter_name, None)
        if handle is not None:
            handle.remove()

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs):
        if not merge:
            for handle in self._hidden_hooks.values():
                handle.remove()
        return super()._unload_and_optionally_merge(merge=merge, **kwargs)

    def _positions_added(self) -> int:
        module = self._active_module()
        return module.config.prompt_length if module is not None and module.config.injection == "input" else 0

    def _active_module(self) -> InstancePromptModule | None:
        if not self._enabled or not self.active_adapters or self.capturing:
            return None
        return self.prompt_modules[self.active_adapters[0]]

    # -- instance_source='hidden' ------------------------------------------------------------------------------

    def _refuse_reentrant_site(self, site: tuple[str, int]) -> None:
        """A layer the hidden-state prompt feeds, run by reentrant checkpointing: its recomputation in backward
        rebuilds the prefix from the call's inputs, which cannot rebuild a prompt made from hidden states. With
        every_n_layers > 1 (transformers 5.25) the layer that reads the hidden states can run outside a checkpoint
        while a later one runs inside: its gradients came back wrong, silently."""
        super()._refuse_reentrant_site(site)
        module = self._active_module()
        hidden = module is not None and module.config.instance_source == "hidden"
        if hidden and module.training and gradient_checkpointing_on(self.model):
            raise _reentrant_refusal()

    def _hidden_states_hook(self, attention: nn.Module, args: tuple, kwargs: dict):
        module = self._active_module()
        if module is None or module.config.instance_source != "hidden" or self._prefixes_off:
            return None
        if self._continuing:
            return None  # continuing a cache: the prompt it was filled with stays
        if module.training and not torch.is_grad_enabled() and gradient_checkpointing_on(self.model):
            raise _reentrant_refusal()
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # (B, T, d)
        # gradient checkpointing recomputing this layer in backward: the call that ran it, whatever ran since
        recomputing = not self._calls and in_backward()
        state = self._state_for(module.config.hidden_source(self.layout)) if recomputing else self._call_state
        inputs = state.inputs if state is not None else self._inputs
        source = inputs.source() if inputs is not None else None
        if source is None and inputs is not None and inputs.attention_mask is not None:
            source = self._frames_present(inputs.attention_mask, hidden)
        if self._instance_done and (self._pinned or source is None or source.shape != hidden.shape[:2]):
            return None  # a decoding step: the prompt of the prefill stays
        # Otherwise (re)compute: gradient checkpointing replays this hook and must see the same operations.
        if source is None or source.shape != hidden.shape[:2]:
            source = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        index, valid = first_source_tokens(source, module.config.instance_tokens)
        vectors = torch.gather(hidden, 1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        prefixes = self.by_site(module, module.combine(module.encode(vectors, valid)))
        self._check_finite(prefixes, None)
        if state is not None:
            state.prefixes = prefixes
        if not recomputing:
            self._prefixes = prefixes
            self._instance_done = True
        return None

    def _frames_present(self, mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T') bool: which hidden states of a model that reads no tokens (image patches, audio) are not padding,
        from the call's attention_mask: as it is where it covers them one to one (Pix2Struct's patches), else
        through the model's own subsampling of it (Wav2Vec2, HuBERT, Speech2Text). A mask that marks padding with
        neither is refused: the prompt would pool the padding, and a padded row would not get its prompt alone."""
        mask = mask if mask.dim() == 2 else mask[..., 0]
        length = hidden.shape[1]
        if mask.shape[1] == length:
            return mask.bool()
        encoder = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
        for owner in (self.model, encoder):
            subsample = getattr(owner, "_get_feature_vector_attention_mask", None)
            if subsample is not None:
                return subsample(length, mask).bool()
        if bool(mask.all()) or self.model.config.model_type in READS_ITS_PADDING:
            return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        raise ValueError(
            f"instance_source='hidden' on {type(self.model).__name__}: the call's attention_mask covers "
            f"{mask.shape[1]} input positions but the hidden states the prompt is built from have {length}, and "
            "the model has no _get_feature_vector_attention_mask to map one onto the other, so peft-ipt cannot "
            "tell which hidden states are padding. Call it on unpadded rows (one at a time, or batched by length) "
            "or use a prefix_tuning_v2 adapter, whose prefix reads no input."
        )

    def _check_generate_continues(self, kwargs: dict, inputs: PromptInputs) -> None:
        module = self._active_module()
        past = cache_argument(kwargs)
        hidden = module is not None and module.config.instance_source == "hidden"
        if hidden and past is not None and past.get_seq_length() > 0 and not drafting(kwargs):
            raise ValueError(
                "instance_source='hidden' cannot generate on from a filled key/value cache: its prompt is built from "
                "hidden states that the cached tokens no longer compute, so it would come from the new tokens alone. "
                "Generate without the cache, or use another instance_source."
            )
        super()._check_generate_continues(kwargs, inputs)

    # -- injection='input' -----------------------------------------------------------------------------------

    def _with_input_prompt(
        self,
        module,
        kwargs: dict,
        inputs: PromptInputs,
        for_generate: bool,
        prompt: torch.Tensor | None = None,
    ) -> dict:
        """The call with the prompt inserted (``prompt``: a cache's own, for a call that runs the encoder again)."""
        embeds = inputs.inputs_embeds
        if embeds is None:
            embeds = self.model.get_input_embeddings()(inputs.input_ids)
        prompt = (module.input_prompt(inputs) if prompt is None else prompt).to(
            embeds.dtype
        )  # (B, P, hidden)
        # what a cache this call fills records (see PromptTuner._remember_prompt)
        self._inserted = prompt.detach()
        batch, length = embeds.shape[:2]
        P = prompt.shape[1]
        mask = kwargs.get("attention_mask")
        # Each row's prompt goes right before its first token (after [CLS] for encoders: the classifier reads it),
        # so a left-padded row holds [padding, prompt, tokens] and its tokens sit from the prompt as they do alone.
        at = first_present(mask, embeds) + (1 if self._encoder_only else 0)  # (B,)
        order, kept = insertion_order(at, length, P)

        def insert(tensor: torch.Tensor, fill) -> torch.Tensor:
            block = tensor.new_full((batch, P, *tensor.shape[2:]), fill) if fill is not None else prompt
            joined = torch.cat([tensor, block], dim=1)
            index = order.view(batch, length + P, *([1] * (tensor.dim() - 2))).expand(
                -1, -1, *tensor.shape[2:]
            )
            return torch.gather(joined, 1, index)

        kwargs = {k: v for k, v in kwargs.items() if k != "input_ids"}
        if kwargs.get("position_ids") is not None:
            raise ValueError(
                "injection='input' inserts its prompt tokens and numbers the positions itself, so it refuses a call "
                "that passes position_ids. Leave them out; to generate, call generate() on the PeftModel, not on "
                "its base model, whose generate() passes them"
            )
        kwargs["inputs_embeds"] = insert(embeds, None)
        kwargs["attention_mask"] = insert(
            mask if mask is not None else embeds.new_ones(batch, length, dtype=torch.long), 1
        )
        numbering = self._padding_numbered_embeddings()
        if numbering is not None and mask is not None and not for_generate and not inputs.is_encoder_decoder:
            # RoBERTa and its kin number positions from input_ids, after the padding; from inputs_embeds they
            # count from the first column, padding included, so a left-padded row's positions moved (its logits
            # 0.3 off the row alone on a tiny RoBERTa decoder, silently). Number them as from input_ids.
            shown = kwargs["attention_mask"].long()
            kwargs["position_ids"] = shown.cumsum(1) * shown + numbering.padding_idx
        # per-token inputs the prompt's positions need too, with what the model fills in where the call gives none:
        # segment 0 (TAPAS's seven token types too), LayoutLM's empty box, MarkupLM's padding XPath
        for name, fill in TOKEN_INPUT_FILLS.items():
            fill = getattr(self.model.config, fill, None) if isinstance(fill, str) else fill
            if kwargs.get(name) is not None and fill is not None:
                kwargs[name] = insert(kwargs[name], fill)
        labels = kwargs.get("labels")
        if labels is not None and not inputs.is_encoder_decoder and labels.shape == (batch, length):
            kwargs["labels"] = insert(labels, -100)
        if "question_positions" in inspect.signature(self.model.forward).parameters:
            if kwargs.get("question_positions") is None:
                raise ValueError(
                    f"injection='input' on {type(self.model).__name__}: without question_positions the model finds "
                    "its question token in input_ids, which the input-level prompt replaces by inputs_embeds (it "
                    "would read position 0 instead). Pass question_positions (they are moved past the prompt), or "
                    "use injection='hybrid' or 'prefix'."
                )
        for name in ("start_positions", "end_positions", "question_positions"):
            if kwargs.get(name) is not None:
                at_rows = at.to(kwargs[name].device).view(-1, *([1] * (kwargs[name].dim() - 1)))
                kwargs[name] = kwargs[name] + P * (kwargs[name] >= at_rows)
        if not for_generate:
            # The prompt's positions are cut out of the named per-token outputs, so the call returns a ModelOutput;
            # a call that asked for a tuple (return_dict=False, or the config's) gets it after the cut.
            asked = kwargs.get("return_dict")
            as_tuple = not (getattr(self.model.config, "return_dict", True) if asked is None else asked)
            if as_tuple:
                kwargs["return_dict"] = True
            # logits_to_keep as a tensor names positions of the caller's sequence, which the prompt moves: every
            # position's logits are computed, and the named ones picked once the prompt's are cut out
            keep = kwargs.get("logits_to_keep")
            if torch.is_tensor(keep):
                kwargs["logits_to_keep"] = 0
            self._trim = (kept, P, length, as_tuple, keep if torch.is_tensor(keep) else None)
        else:
            self._kept = kept
        return kwargs

    def _continue_call(self, kwargs: dict, record: CachePrompt, past) -> dict:
        """A call continuing a cache whose prefill had an input-level prompt (a hand-written decoding loop, a later
        chunk): the cache holds the prompt's P positions, which a mask over the caller's own tokens lacks (and
        transformers would pad it with zeros at the end, hiding the newest keys). Widen it by P columns where the
        prefill put the prompt: before each row's first token."""
        if record.inserted is None:
            return kwargs
        if getattr(self.model.config, "is_encoder_decoder", False):
            # the encoder's side: its outputs passed on (the prompt's states put back), or its input again (the
            # cache's prompt inserted as the prefill did)
            if kwargs.get("encoder_outputs") is not None:
                return self._continue_from_encoder(kwargs)
            module = self._active_module()
            if module is None or module.config.injection != "input":
                return kwargs
            if kwargs.get("input_ids") is None and kwargs.get("inputs_embeds") is None:
                return kwargs
            inputs = self._inputs_from_call((), kwargs)
            return self._with_input_prompt(module, kwargs, inputs, for_generate=False, prompt=record.inserted)
        mask, tokens = kwargs.get("attention_mask"), kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if not torch.is_tensor(mask) or mask.dim() != 2 or not torch.is_tensor(tokens):
            return kwargs
        P = record.inserted.shape[1]
        if mask.shape[1] != past.get_seq_length() + tokens.shape[1] - P:
            return kwargs  # already over every cached position (the prompt's included), or not a 2-D padding mask
        _, kept = insertion_order(first_present(mask, mask), mask.shape[1], P)
        return {**kwargs, "attention_mask": widen_mask(mask, kept, P)}

    def _continue_from_encoder(self, kwargs: dict, trim: bool = True) -> dict:
        """A decoder call on encoder outputs that a call of the encoder alone returned (trimmed to the caller's
        tokens): the decoder attends to the prompt's states too, as in a call of the whole model. Put them back,
        and widen the encoder's mask by their P columns."""
        outputs = kwargs["encoder_outputs"]
        carried = getattr(outputs, ENCODER_PROMPT_STATES, None)
        if carried is None:
            return kwargs
        full, kept = carried
        length, P = kept.shape[1], full.shape[1] - kept.shape[1]
        if outputs[0].shape[1] != length:
            return kwargs  # not the trimmed states (already with the prompt's positions)
        kwargs = {**kwargs, "encoder_outputs": type(outputs)(**{**outputs, "last_hidden_state": full})}
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[1] == length:
            kwargs["attention_mask"] = widen_mask(mask, kept, P)
        if trim:  # the encoder states this call returns: the caller's positions
            self._trim = (kept, P, length, False, None)
        return kwargs

    def _transform_call(self, args: tuple, kwargs: dict, inputs: PromptInputs):
        module = self._active_module()
        if module is None or module.config.injection != "input":
            return args, kwargs
        if args and torch.is_tensor(args[0]):
            kwargs, args = {**kwargs, "input_ids": args[0]}, args[1:]
        return args, self._with_input_prompt(module, kwargs, inputs, for_generate=False)

    def _generate_call(self, args: tuple, kwargs: dict, inputs: PromptInputs):
        module = self._active_module()
        if module is None:
            return args, kwargs
        self._refuse_chunked_prefill(module.config, kwargs, inputs)
        if module.config.injection != "input":
            return args, kwargs
        if args and torch.is_tensor(args[0]):
            kwargs, args = {**kwargs, "input_ids": args[0]}, args[1:]
        if kwargs.get("input_ids") is None and kwargs.get("inputs_embeds") is None:
            return args, kwargs  # on encoder outputs alone: their prompt's states are back in them already
        self._refuse_an_assistant(kwargs)
        if inputs.is_encoder_decoder:
            self._refuse_an_encoder_without_embeddings()
        source = kwargs.get("input_ids")
        length = (source if source is not None else kwargs["inputs_embeds"]).shape[1]
        # what _finish_generate needs: the decoder's input to put back in front, the lengths to cut the states by
        self._generated = (
            None if inputs.is_encoder_decoder else source,
            length,
            module.config.prompt_length,
            inputs.is_encoder_decoder,
        )
        if not inputs.is_encoder_decoder:
            kwargs = self._lengths_past_the_prompt(kwargs, module.config.prompt_length)
        return args, self._with_input_prompt(module, kwargs, inputs, for_generate=True)

    def _lengths_past_the_prompt(self, kwargs: dict, prompt_length: int) -> dict:
        """A decoder's generate() from inputs_embeds counts max_length and min_length from the embeddings, which hold
        the P prompt tokens: move both by P, so they count the caller's tokens as without the prompt."""
        kwargs = dict(kwargs)
        for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            length = self._generation_setting(kwargs, total)
            if length and self._generation_setting(kwargs, new) is None:
                kwargs[total] = length + prompt_length
        return kwargs

    def _refuse_chunked_prefill(self, config, kwargs: dict, inputs: PromptInputs) -> None:
        """transformers' chunked prefill (prefill_chunk_size) runs a decoder's prompt in pieces on one cache: the
        sources read from input_ids build the prompt from the whole input first, once per generate(), but two cannot."""
        chunk = self._generation_setting(kwargs, "prefill_chunk_size")
        if chunk is None or inputs.is_encoder_decoder:
            return
        if config.injection == "input":
            why = (
                "its prompt is P soft tokens in front of the input, so generate() runs from inputs_embeds, which "
                "transformers' chunked prefill cannot split (it splits input_ids)"
            )
        elif config.instance_source == "hidden":
            why = (
                "instance_source='hidden' builds the prompt from the hidden states of the call that fills the cache, "
                f"which would be the first {chunk} tokens' alone"
            )
        else:
            return
        raise ValueError(
            f"{why}: generate() with prefill_chunk_size={chunk} is refused. Generate without it (set "
            "prefill_chunk_size=None, in the model's generation_config too), or use instance_source='embeddings' or "
            "'frozen_model' with injection='hybrid' or 'prefix', whose prompts are built from the whole input once "
            "per generate() and give the same tokens chunked."
        )

    def _padding_numbered_embeddings(self) -> nn.Module | None:
        """The embeddings module of a model that numbers positions from input_ids after its padding (RoBERTa's
        create_position_ids_from_input_ids; MPNet's is a function of its modeling file, beside the embeddings'
        create_position_ids_from_inputs_embeds), or None."""
        known = self.__dict__.setdefault("_numbering", {})
        if "embeddings" not in known:
            known["embeddings"] = next(
                (
                    m
                    for m in self.model.modules()
                    if (
                        hasattr(m, "create_position_ids_from_input_ids")
                        or hasattr(m, "create_position_ids_from_inputs_embeds")
                    )
                    and isinstance(getattr(m, "padding_idx", None), int)
                ),
                None,
            )
        return known["embeddings"]

    def _refuse_an_encoder_without_embeddings(self) -> None:
        """generate() on an encoder-decoder model runs the encoder on the prompted inputs_embeds alone; an encoder
        whose forward requires input_ids (FSMT's) failed there with a TypeError."""
        encoder = self.model.get_encoder()
        needed = inspect.signature(encoder.forward).parameters.get("input_ids")
        if needed is not None and needed.default is inspect.Parameter.empty:
            raise ValueError(
                f"injection='input' cannot generate with {type(self.model).__name__}: generate() runs its encoder "
                f"({type(encoder).__name__}) on the prompted inputs_embeds alone, and that encoder requires "
                "input_ids. Use injection='prefix' or 'hybrid' (the forward pass takes the input-level prompt)."
            )

    def _refuse_an_assistant(self, kwargs: dict) -> None:
        """Assisted generation drafts from input_ids, which an input-level prompt's generate() does not pass."""
        early_exit = self._generation_setting(kwargs, "assistant_early_exit")
        if kwargs.get("assistant_model") is None and early_exit is None:
            return
        given = (
            "assistant_model"
            if kwargs.get("assistant_model") is not None
            else f"assistant_early_exit={early_exit}"
        )
        raise ValueError(
            f"injection='input' cannot generate with {given}: its prompt is P soft tokens in front of the input, "
            "so generate() runs from inputs_embeds, while transformers' assisted generation drafts from input_ids. "
            "Generate without an assistant (prompt_lookup_num_tokens works), or use injection='hybrid' or 'prefix', "
            "whose prompts leave the input alone and generate with an assistant token for token as without one."
        )

    def _finish_generate(self, output, args: tuple, kwargs: dict):
        generated, self._generated = getattr(self, "_generated", None), None  # (absent from older pickles)
        if generated is None:
            return output
        source, length, P, encoder_decoder = generated
        kept, self._kept = getattr(self, "_kept", None), None

        # A decoder's generate() from inputs_embeds returns only new tokens; give back the input + new tokens as usual.
        def with_input(new_tokens: torch.Tensor) -> torch.Tensor:
            if source is None:
                return new_tokens
            rows = source.repeat_interleave(new_tokens.shape[0] // source.shape[0], dim=0)
            return torch.cat([rows, new_tokens], dim=1)

        # as in forward: the prompt's positions out of each layer's states
        def cut(states: tuple) -> tuple:
            return tuple(
                keep_positions(h, kept) if h.dim() == 3 and h.shape[1] == length + P else h for h in states
            )

        if torch.is_tensor(output):
            return with_input(output)
        if not torch.is_tensor(getattr(output, "sequences", None)):
            return output
        output.sequences = with_input(output.sequences)  # return_dict_in_generate=True
        if encoder_decoder and getattr(output, "encoder_hidden_states", None):
            output.encoder_hidden_states = cut(output.encoder_hidden_states)
        # a decoder's first step covers the prompt too
        if not encoder_decoder and getattr(output, "hidden_states", None):
            output.hidden_states = (cut(output.hidden_states[0]), *output.hidden_states[1:])
        return output

    def _abandon_call(self) -> None:
        # else the next call's outputs, if as long as this one's with its prompt, would be cut
        self._trim = None

    def _finish_call(self, role: str, output):
        """Trim an input-level prompt's positions out of the per-token outputs of the call that inserted it."""
        if self._trim is None:
            return None
        kept, P, length, as_tuple, keep = self._trim
        self._trim = None
        encoder_decoder = getattr(self.model.config, "is_encoder_decoder", False)
        encoder_side = role == ENCODER_CALL or not encoder_decoder
        full = (
            getattr(output, "last_hidden_state", None) if role == ENCODER_CALL and encoder_decoder else None
        )
        names = PER_TOKEN_OUTPUTS if encoder_side else ("encoder_last_hidden_state",)

        def cut(tensor, per_token_2d: bool = False):
            # per-token outputs: (B, T+P, ...) with 3 dims, or QA's (B, T+P) span logits; never (B, labels)
            per_token = torch.is_tensor(tensor) and (tensor.dim() >= 3 or per_token_2d)
            if per_token and tensor.shape[1] == length + P:
                return keep_positions(tensor, kept)
            return tensor

        for name in names:
            if getattr(output, name, None) is not None:
                span = name in ("start_logits", "end_logits")
                setattr(output, name, cut(getattr(output, name), per_token_2d=span))
        # every layer's hidden states, as the last one: the encoder's of an encoder-decoder model's whole call too
        for name in ("hidden_states",) if encoder_side else ("encoder_hidden_states",):
            if getattr(output, name, None) is not None:
                setattr(output, name, tuple(cut(h) for h in getattr(output, name)))
        if keep is not None and encoder_side and getattr(output, "logits", None) is not None:
            output.logits = output.logits[:, keep.to(output.logits.device)]
        if torch.is_tensor(full) and full.shape[1] == length + P and not as_tuple:
            # an encoder called alone: the decoder called on these outputs gets the prompt's states back
            setattr(output, ENCODER_PROMPT_STATES, (full, kept))
        return output.to_tuple() if as_tuple and hasattr(output, "to_tuple") else output
