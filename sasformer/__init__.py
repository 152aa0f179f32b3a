"""sasformer: SAS (Simulated Attention Score) and the attention variants it is compared with."""

from sasformer.generation import load_decoder
from sasformer.layers.registry import build_attention, variant_names
from sasformer.models.config import ModelConfig
from sasformer.models.decoder import DecoderLM, KVCache, lm_loss
from sasformer.models.presets import SIZES, matched_attention_args, preset
from sasformer.reference import load_reference_sas

__version__ = "0.1.0"

# AutoConfig / AutoModel / AutoModelForCausalLM know model_type "sasformer" once sasformer is imported
# (a no-op when transformers is not installed)
from sasformer.models.hf import register as _register_hf

_register_hf()

__all__ = [
    "SIZES",
    "DecoderLM",
    "KVCache",
    "ModelConfig",
    "build_attention",
    "lm_loss",
    "load_decoder",
    "load_reference_sas",
    "matched_attention_args",
    "preset",
    "variant_names",
]
