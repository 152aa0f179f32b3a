from __future__ import annotations

import json

import pytest

from sasformer.data.tokenizer import (
    META_FILE,
    HFTokenizersTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
    train_bpe,
)


def test_bpe_roundtrip_and_eot(bpe, texts):
    assert 257 < bpe.vocab_size <= 300
    assert bpe.decode([bpe.eot_id]) == "<|endoftext|>"
    for text in texts:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
    # a literal end-of-text string inside a document is ordinary text
    assert bpe.eot_id not in bpe.encode(texts[4])
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


def test_bpe_merges_learned(bpe):
    # "the" appears often in the fixture: it must be shorter than its 3 bytes after training
    assert len(bpe.encode(" the")) < 4


def test_bpe_save_load_same_fingerprint(bpe, texts, tmp_path):
    bpe.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, HFTokenizersTokenizer)
    assert again.fingerprint == bpe.fingerprint
    assert (again.vocab_size, again.eot_id) == (bpe.vocab_size, bpe.eot_id)
    assert again.encode_batch(texts) == bpe.encode_batch(texts)


def test_fingerprint_depends_on_vocabulary(bpe, texts):
    other = train_bpe(texts * 4, vocab_size=280, show_progress=False)
    assert other.fingerprint != bpe.fingerprint
    assert len(bpe.fingerprint) == 64


def test_tokenizers_json_file(bpe, texts, tmp_path):
    path = tmp_path / "tokenizer.json"
    bpe._tok.save(str(path))
    tok = load_tokenizer(path)
    assert tok.eot_id == bpe.eot_id and tok.fingerprint == bpe.fingerprint
    assert tok.encode(texts[0]) == bpe.encode(texts[0])


def test_tokenizers_json_with_truncation_and_padding_keeps_whole_documents(bpe, texts, tmp_path):
    # many published tokenizer.json files are saved with truncation on; documents must not be cut or padded
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_str(bpe._tok.to_str())
    raw.enable_truncation(max_length=4)
    raw.enable_padding(length=64, pad_id=bpe.eot_id)
    path = tmp_path / "tokenizer.json"
    raw.save(str(path))
    tok = load_tokenizer(path)
    long_text = max(texts, key=len)
    assert len(bpe.encode(long_text)) > 4
    assert tok.encode(long_text) == bpe.encode(long_text)
    assert tok.encode_batch(texts) == bpe.encode_batch(texts)
    assert tok.fingerprint == bpe.fingerprint


def test_tokenizers_json_unknown_eot(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    bpe._tok.save(str(path))
    with pytest.raises(ValueError, match="no token '<eos>'"):
        load_tokenizer(path, eot_token="<eos>")


def test_tiktoken_tiny_ranks(ranks_file, texts, tmp_path):
    tok = load_tokenizer(ranks_file)
    assert isinstance(tok, TiktokenTokenizer)
    assert (tok.vocab_size, tok.eot_id) == (256 + 8 + 1, 256 + 8)
    # r50k pre-tokenisation splits "the cat" into "the", " cat", both single merged tokens
    assert tok.encode("the cat") == [258, 263]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eot_id not in tok.encode(texts[4])
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.fingerprint == tok.fingerprint and again.encode_batch(texts) == tok.encode_batch(texts)


def test_tiktoken_fingerprint_changes_with_ranks(make_ranks):
    a = load_tokenizer(make_ranks("a.tiktoken"))
    b = load_tokenizer(make_ranks("b.tiktoken", [b"th", b"he"]))
    assert a.fingerprint != b.fingerprint
    assert load_tokenizer(make_ranks("c.tiktoken")).fingerprint == a.fingerprint


def test_tiktoken_bad_rank_files(tmp_path):
    gap = tmp_path / "gap.tiktoken"
    gap.write_bytes(b"YQ== 0\nYg== 2\n")
    with pytest.raises(ValueError, match="without gaps"):
        load_tokenizer(gap)
    junk = tmp_path / "junk.tiktoken"
    junk.write_bytes(b"YQ== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="junk.tiktoken:2"):
        load_tokenizer(junk)


def test_saved_tokenizer_tampered(ranks_file, tmp_path):
    tok = load_tokenizer(ranks_file)
    tok.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / META_FILE).read_text())
    meta["fingerprint"] = "0" * 64
    (tmp_path / "saved" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match its recorded fingerprint"):
        load_tokenizer(tmp_path / "saved")


def test_unknown_specs(tmp_path):
    with pytest.raises(ValueError, match="not an existing file or folder"):
        load_tokenizer(tmp_path / "nope")
    odd = tmp_path / "vocab.bin"
    odd.write_bytes(b"\0")
    with pytest.raises(ValueError, match="cannot tell what kind"):
        load_tokenizer(odd)


def test_hf_tokenizer_folder(bpe, texts, tmp_path):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tok, eos_token="<|endoftext|>")
    fast.save_pretrained(tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "hf")
    assert tok.kind == "hf" and tok.eot_id == bpe.eot_id and tok.vocab_size == bpe.vocab_size
    assert tok.encode_batch(texts) == bpe.encode_batch(texts)
    assert tok.eot_id not in tok.encode(texts[4])
    assert tok.decode(tok.encode(texts[1])) == texts[1]
    tok.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").fingerprint == tok.fingerprint


def test_hf_name_offline_fails_clearly(monkeypatch):
    pytest.importorskip("transformers")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="needs network access"):
        load_tokenizer("hf:no-such-org/no-such-tokenizer")


def test_vocab_size_is_the_highest_id_plus_one_when_ids_skip(tmp_path):
    # a hand-made vocabulary whose ids leave gaps: its count (4) would pick uint16 shards too narrow for id 70000
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    raw = Tokenizer(WordLevel({"a": 0, "b": 1, "<|endoftext|>": 2, "c": 70000}, unk_token="a"))
    raw.pre_tokenizer = Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.vocab_size == 70001 and tok.encode("c b") == [70000, 1]
