from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sasformer.train.config import TrainConfig, load_config, parse_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seq_len: 32\nmodel:\n  size: tiny\n  attention: sas\noptim:\n  lr: 1.0e-3\n")
    overrides = parse_overrides(["--model.attention_args.kernel_size", "1", "--optim.lr=3e-4",
                                 "--optim.betas", "[0.9, 0.99]", "--compile", "true", "--max_steps", "null",
                                 "--max_tokens", "1e6"])
    cfg = load_config(path, overrides)
    assert cfg.model.attention == "sas" and cfg.model.attention_args == {"kernel_size": 1}
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.compile is True and cfg.max_steps is None and cfg.max_tokens == 1_000_000
    assert cfg.seq_len == 32
    assert cfg.total_steps() == -(-1_000_000 // (cfg.batch_size * 32))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"optim.lrr": 1}, "optim.lrr"),
        ({"learning_rate": 1}, "learning_rate"),
        ({"model.depth": 3}, "model.depth"),
    ],
)
def test_unknown_keys_are_named_with_the_known_ones(overrides, fragment):
    with pytest.raises(ValueError, match=fragment) as err:
        load_config(None, overrides)
    assert "known keys" in str(err.value)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"optim\.learning_rate.*optim\.lr"):
        load_config(path)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"seq_len": "long"}, "seq_len must be an integer"),
        ({"seq_len": 3.5}, "seq_len must be an integer"),
        ({"compile": "yes"}, "compile must be true or false"),
        ({"optim.betas": [0.9]}, "optim.betas must be a list of 2"),
        ({"max_tokens": 100}, "exactly one of max_steps"),
        ({"dtype": "fp16"}, "dtype"),
        ({"optim.min_lr": 1.0}, "min_lr"),
        ({"parallel": "tp"}, "parallel"),
        ({"fsdp_param_dtype": "bfloat16"}, "fsdp_param_dtype"),
        ({"residual_dtype": "bfloat16"}, "residual_dtype='bfloat16': use float32 or compute"),
        ({"loss_impl": "fast"}, "loss_impl='fast': use one of"),
        ({"loss_chunk_size": 0}, "loss_chunk_size=0 must be >= 1"),
        ({"compile_mode": "reduce-overhead"}, "compile_mode='reduce-overhead'"),
        ({"compile_mode": "max-autotune-no-cudagraphs", "compile_options": {"max_autotune": True}}, "not both"),
        ({"compile_scope": "layer"}, "compile_scope='layer': use auto, model or block"),
        ({"compile_scope": "model", "parallel": "fsdp"}, "cannot run under parallel='fsdp'"),
    ],
)
def test_bad_values(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_config(None, overrides)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--seq_len"])
    with pytest.raises(ValueError, match="expected --key value"):
        parse_overrides(["seq_len", "3"])


def test_grad_accum_splits_the_global_batch():
    cfg = TrainConfig(batch_size=16, micro_batch_size=2)
    assert cfg.grad_accum(1) == 8 and cfg.grad_accum(2) == 4 and cfg.micro_batch(4) == 2
    assert TrainConfig(batch_size=16).grad_accum(4) == 1
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        TrainConfig(batch_size=16, micro_batch_size=3).grad_accum(1)


def test_model_section_builds_with_the_data_vocab():
    cfg = load_config(None, {"model.attention": "gqa", "model.d_model": 64, "model.n_layers": 2,
                             "model.attention_args": {"n_heads": 6, "n_kv_heads": 2, "head_dim": 16}, "seq_len": 300})
    model = cfg.model.build(vocab_size=321, seq_len=cfg.seq_len)
    assert (model.vocab_size, model.d_model, model.n_layers, model.attention) == (384, 64, 2, "gqa")
    assert cfg.model.build(vocab_size=50257, seq_len=16).vocab_size == 50304
    cfg.model.pad_vocab_to = 1
    assert cfg.model.build(vocab_size=321, seq_len=16).vocab_size == 321
    assert model.max_seq_len == 300  # longer than the tiny preset's 256
    bad = load_config(None, {"model.attention": "sas", "model.attention_args.kernel_sise": 1})
    with pytest.raises(ValueError, match="kernel_sise"):
        bad.model.build(vocab_size=100, seq_len=16)


@pytest.mark.parametrize("name", ["tiny", "small", "medium"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    cfg.model.build(vocab_size=50304, seq_len=cfg.seq_len)
    assert cfg.total_steps() >= 1


def test_command_collects_dotted_overrides():
    from sasformer.commands import train as command

    parser = argparse.ArgumentParser(prog="sasformer")
    sub = parser.add_subparsers(dest="command", required=True)
    command.add_arguments(sub.add_parser("train"))
    args = parser.parse_args(["train", "--config", "c.yaml", "--model.attention_args.kernel_size", "1",
                              "--optim.lr=1e-3", "--print-config"])
    assert args.config == "c.yaml" and args.print_config
    assert parse_overrides(args.overrides) == {"model.attention_args.kernel_size": 1, "optim.lr": 1e-3}


def test_print_config(capsys):
    from sasformer.commands import train as command

    args = argparse.Namespace(config=None, print_config=True, overrides=["--seq_len", "7"])
    assert command.run(args) == 0
    assert "seq_len: 7" in capsys.readouterr().out


def test_loss_impls_match_the_ops():
    from sasformer.ops.cross_entropy import IMPLS
    from sasformer.train.config import LOSS_IMPLS

    assert LOSS_IMPLS == IMPLS
    for impl in IMPLS:
        assert TrainConfig(loss_impl=impl).loss_impl == impl
