"""Hugging Face models around the sasformer decoder: ``SASFormerModel`` and ``SASFormerForCausalLM``.

The blocks are :class:`sasformer.models.decoder.DecoderBlock` and the forward pass is
:func:`sasformer.models.decoder.run_blocks`, so these classes compute exactly what ``DecoderLM``
computes. The KV cache is :class:`SASFormerCache` (our per-variant cache with the methods
``generate()`` calls); the model creates it itself, so ``generate()`` never builds a
``DynamicCache`` it could not use. Older transformers 5.x releases (5.17) name the cache argument
``past_key_values``, newer ones (5.24) ``cache``: both are accepted, and the output uses the name
this version's ``CausalLMOutputWithPast`` has.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from sasformer.layers.sas import SimulatedAttention
from sasformer.layers.simulation import FeatureSimulation, HeadSimulation
from sasformer.layers.tpa import HeadFactor
from sasformer.models.decoder import DecoderBlock, DecoderLM, KVCache, lm_loss, rotary_cache, run_blocks
from sasformer.models.hf.configuration_sasformer import SASFormerConfig
from sasformer.ops.rope import RotaryCache

try:  # transformers >= 5: initialisers that leave weights loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    from torch.nn import init

# the output field that carries the cache in this transformers version
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class SASFormerCache(KVCache):
    """:class:`KVCache` plus the cache methods ``GenerationMixin`` calls (length, crop, beam reorder)."""

    is_compileable = False
    is_croppable = True

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seq_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1 if self.layers[layer_idx].capacity is None else self.layers[layer_idx].capacity

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.reorder(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self.reorder(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.repeat_interleave(repeats)

    def activate_past_recording(self) -> None:
        """Nothing to record: cropping keeps the cached prefix, whatever happened after it."""


def _pick_cache(cache: KVCache | None, past_key_values: KVCache | None) -> KVCache | None:
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, KVCache):
        raise ValueError(
            f"SASFormer models keep their own KV cache (SASFormerCache); got {type(cache).__name__}. "
            "Pass cache=None and let the model create it, or use model.new_cache()."
        )
    return cache


class SASFormerPreTrainedModel(PreTrainedModel):
    config_class = SASFormerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["DecoderBlock"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The initialisation of ``DecoderLM.reset_parameters``, of the simulation blocks and of TPA's head factors."""
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            # residual outputs are scaled by 1/sqrt(2L), as in DecoderLM
            scale = (2 * self.config.n_layers) ** -0.5 if getattr(module, "_residual_output", False) else 1.0
            init.normal_(module.weight, mean=0.0, std=std * scale)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, HeadFactor):
            # TPA's head factors keep their own scale (q, k, v then start at MHA's variance; see tpa.py)
            init.normal_(module.weight, mean=0.0, std=module.init_std())
        elif isinstance(module, RotaryCache):
            # non-persistent tables are never in a checkpoint: recompute them where they live
            module.reset_tables()
        elif isinstance(module, (HeadSimulation, FeatureSimulation)):
            if getattr(module, "_identity_init", False):
                # sim_init="identity": a copy of the input (these in-place writes skip loaded weights by hand)
                if not any(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
                    module.reset_identity()
                return
            if isinstance(module, HeadSimulation):
                pairs = ((module.w1, module.b1, module.in_heads * module.kernel_size),
                         (module.w2, module.b2, module.out_heads * module.kernel_size))
            else:
                pairs = ((module.w3, module.b3, module.in_dim), (module.w4, module.b4, module.out_dim))
            for weight, bias, fan_in in pairs:
                bound = 1.0 / math.sqrt(fan_in)
                init.uniform_(weight, -bound, bound)
                init.uniform_(bias, -bound, bound)


class SASFormerModel(SASFormerPreTrainedModel):
    """The decoder without its LM head; returns the final-norm hidden states."""

    def __init__(self, config: SASFormerConfig) -> None:
        super().__init__(config)
        model_config = config.to_model_config()
        self.embed = nn.Embedding(model_config.vocab_size, model_config.d_model)
        self.blocks = nn.ModuleList(DecoderBlock(model_config) for _ in range(model_config.n_layers))
        self.rotary = rotary_cache(model_config, self.blocks)
        self.norm = nn.RMSNorm(model_config.d_model, eps=model_config.norm_eps)
        for name, module in self.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                module._residual_output = True
            if isinstance(module, SimulatedAttention) and module.args.sim_init == "identity":
                for block in (module.heads_q, module.heads_k, module.heads_v, module.features_q, module.features_k):
                    if block is not None:
                        block._identity_init = True
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def new_cache(self, capacity: int | None = None) -> SASFormerCache:
        return SASFormerCache(self.config.n_layers, capacity)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("SASFormerModel needs input_ids; inputs_embeds is not supported")
        for flag in ("output_attentions", "output_hidden_states"):
            asked = kwargs.get(flag)
            if asked if asked is not None else getattr(self.config, flag, False):  # None would look like an answer
                raise ValueError(f"{flag}=True is not supported by SASFormerModel")
        cache = _pick_cache(cache, past_key_values)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is None and use_cache:
            cache = self.new_cache()
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D (batch, cache length + seq), got {attention_mask.dim()}-D")
        x = run_blocks(self.embed, self.blocks, self.rotary, input_ids, attention_mask, cache, position_ids)
        hidden = self.norm(x)
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        if not return_dict:
            return (hidden, cache)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_FIELD: cache})


class SASFormerForCausalLM(SASFormerPreTrainedModel, GenerationMixin):
    """Causal LM: ``SASFormerModel`` plus the (optionally tied) output projection."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: SASFormerConfig) -> None:
        super().__init__(config)
        self.model = SASFormerModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def new_cache(self, capacity: int | None = None) -> SASFormerCache:
        return self.model.new_cache(capacity)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: each variant caches its own tensors
        return False

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (B, T, vocab); with ``labels`` (B, T) also the mean next-token loss (labels are shifted here,
        -100 is ignored). ``logits_to_keep`` > 0 computes logits for the last that many positions only."""
        if labels is not None and logits_to_keep > 0:
            raise ValueError(f"labels score every position; logits_to_keep={logits_to_keep} keeps only the last "
                             "ones (pass logits_to_keep=0 with labels)")
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, return_dict=True,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = lm_loss(logits[:, :-1], labels[:, 1:].to(logits.device))
        new_cache = getattr(out, CACHE_FIELD)
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        if not return_dict:
            return (logits, new_cache) if loss is None else (loss, logits, new_cache)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: new_cache})

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        cache: KVCache | None = None,
        past_key_values: KVCache | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed only the tokens the cache has not seen; the full 2-D mask gives positions and padding."""
        cache = _pick_cache(cache, past_key_values)
        if cache is None and use_cache:
            cache = self.new_cache()
        past = cache.seq_len if cache is not None else 0
        inputs: dict[str, Any] = {
            "input_ids": input_ids[:, past:].contiguous(),
            "attention_mask": attention_mask,
            CACHE_FIELD: cache,
            "use_cache": use_cache,
        }
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def to_decoder_lm(self) -> DecoderLM:
        """A :class:`DecoderLM` with these weights (shared, not copied)."""
        with torch.device("meta"):
            decoder = DecoderLM(self.config.to_model_config())
        decoder.embed, decoder.blocks, decoder.norm = self.model.embed, self.model.blocks, self.model.norm
        decoder.rotary = self.model.rotary
        decoder.lm_head = self.lm_head
        return decoder

    @classmethod
    def from_decoder_lm(cls, decoder: DecoderLM, **config_kwargs: Any) -> SASFormerForCausalLM:
        """Wrap the weights of a :class:`DecoderLM` (copied); ``config_kwargs`` add HF config fields."""
        config = SASFormerConfig.from_model_config(decoder.config, **config_kwargs)
        model = cls(config)
        model.load_state_dict(hf_state_dict(decoder.state_dict()), strict=True)
        return model.to(next(decoder.parameters()).dtype)


def hf_state_dict(decoder_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``DecoderLM`` parameter names -> ``SASFormerForCausalLM`` names (``embed.weight`` -> ``model.embed.weight``)."""
    return {(name if name.startswith("lm_head.") else f"model.{name}"): value for name, value in decoder_state.items()}
