"""Training checkpoint -> Hugging Face directory (weights, config, generation config, tokenizer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from sasformer.generation import TOKENIZER_DIR, TOKENIZER_META, find_tokenizer, load_decoder, load_text_tokenizer
from sasformer.models.hf import register
from sasformer.utils.vocab import vocab_extent


def hf_tokenizer_from_saved(tokenizer_path: Path):
    """A ``PreTrainedTokenizerFast`` equivalent to a saved sasformer tokenizer folder or a tokenizer file."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if tokenizer_path.is_file():
        kind, file, eot, pattern = ("tiktoken" if tokenizer_path.suffix == ".tiktoken" else "tokenizers",
                                    tokenizer_path, None, None)
    else:
        meta = json.loads((tokenizer_path / TOKENIZER_META).read_text())
        kind, file = meta["kind"], tokenizer_path / meta["file"]
        eot, pattern = meta.get("eot_token"), meta.get("pattern")
    if kind == "hf":
        return AutoTokenizer.from_pretrained(str(file))
    text_tok = load_text_tokenizer(tokenizer_path)
    eot = eot or getattr(text_tok, "eot_token", None)
    if kind == "tiktoken":
        from transformers.convert_slow_tokenizer import TikTokenConverter

        backend = TikTokenConverter(vocab_file=str(file), pattern=pattern or text_tok.pattern,
                                    extra_special_tokens={eot: text_tok.eot_id}).converted()
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eot, bos_token=eot)
    return PreTrainedTokenizerFast(tokenizer_file=str(file), eos_token=eot, bos_token=eot)


def export_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``out_dir`` loadable with ``AutoModelForCausalLM.from_pretrained`` (after ``import sasformer``).

    The tokenizer (``tokenizer`` or the one found next to the checkpoint) is written twice: as
    Hugging Face files (for ``AutoTokenizer``/lm-eval) and as ``out_dir/tokenizer/`` (for ``sasformer generate``).
    """
    if not register():
        raise ValueError("exporting to the Hugging Face format needs transformers (pip install 'sasformer[hf]')")
    from sasformer.models.hf.modeling_sasformer import SASFormerForCausalLM

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"--out {out_dir} must differ from the checkpoint directory")
    decoder = load_decoder(checkpoint_dir, dtype=dtype)
    tok_path = Path(tokenizer) if tokenizer is not None else find_tokenizer(checkpoint_dir)
    if tok_path is not None and not tok_path.exists():
        raise ValueError(f"tokenizer {tok_path} does not exist")
    hf_tok, token_ids = None, {}
    if tok_path is not None:
        hf_tok = hf_tokenizer_from_saved(tok_path)
        if hf_tok.eos_token_id is not None:
            token_ids = {"eos_token_id": hf_tok.eos_token_id, "bos_token_id": hf_tok.eos_token_id}
        ids_needed = vocab_extent(hf_tok.get_vocab().values(), len(hf_tok))
        if ids_needed > decoder.config.vocab_size:
            raise ValueError(
                f"tokenizer {tok_path} has ids up to {ids_needed - 1} but the model's vocab_size is "
                f"{decoder.config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)"
            )
    model = SASFormerForCausalLM.from_decoder_lm(decoder, **token_ids)
    model.save_pretrained(out_dir)
    if hf_tok is not None:
        hf_tok.save_pretrained(str(out_dir))
        if tok_path.is_dir():
            shutil.copytree(tok_path, out_dir / TOKENIZER_DIR, dirs_exist_ok=True)
        else:
            text_tok = load_text_tokenizer(tok_path)
            if hasattr(text_tok, "save"):  # sasformer.data tokenizers; otherwise tokenizer.json above serves
                text_tok.save(out_dir / TOKENIZER_DIR)
    return out_dir
