"""Tiny models, tokenizers and checkpoints shared by the Hugging Face tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sasformer.models.config import ModelConfig
from sasformer.models.decoder import DecoderLM

VOCAB = 61  # = len(WORDS)
WORDS = ["<|endoftext|>", "[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "and"] + [
    f"w{i}" for i in range(48)
]

VARIANTS: dict[str, tuple[str, dict]] = {
    "mha": ("mha", {"n_heads": 4}),
    "gqa": ("gqa", {"n_heads": 4, "n_kv_heads": 2}),
    "mqa": ("mqa", {"n_heads": 4}),
    "mla": ("mla", {"n_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 8,
                    "qk_rope_head_dim": 4, "v_head_dim": 6}),
    "tpa": ("tpa", {"n_heads": 4, "q_rank": 3, "k_rank": 2, "v_rank": 2}),
    "sas-simulated": ("sas", {"n_heads": 4, "n_sim_heads": 8, "sim_head_dim": 12}),
    "sas-compact": ("sas", {"n_heads": 4, "n_sim_heads": 8, "sim_head_dim": 12, "cache_mode": "compact"}),
    "sas-before": ("sas", {"n_heads": 4, "rope": "before", "cache_mode": "compact"}),
    "sas-none": ("sas", {"n_heads": 4, "rope": "none", "sim_head_dim": 7}),
    "sas-gqa": ("sas", {"n_heads": 4, "n_kv_heads": 2, "n_sim_heads": 12, "kernel_size": 1, "cache_mode": "compact"}),
}


def tiny_config(name: str, tie: bool = True, init_std: float = 0.3) -> ModelConfig:
    attention, args = VARIANTS[name]
    return ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, max_seq_len=128, attention=attention,
                       attention_args=dict(args), init_std=init_std, tie_embeddings=tie)


def tiny_decoder(name: str, tie: bool = True, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(tiny_config(name, tie)).eval()


def write_tokenizer_json(path: Path) -> Path:
    """A word-level ``tokenizers`` file over :data:`WORDS` (whitespace split, space-joined decode)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def write_training_checkpoint(decoder: DecoderLM, directory: Path, nested: bool = True) -> Path:
    """The training layout: model.safetensors (a tied head stored once) + config.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in decoder.state_dict().items()}
    if decoder.config.tie_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(directory / "model.safetensors"))
    config = decoder.config.to_dict()
    payload = {"model": config, "train": {"seed": 0}, "step": 7} if nested else config
    (directory / "config.json").write_text(json.dumps(payload))
    return directory
