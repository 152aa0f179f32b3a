from __future__ import annotations

import pytest
import torch

from sasformer import DecoderLM, ModelConfig, lm_loss
from sasformer.models.presets import preset

VARIANTS = ["mha", "gqa", "mqa", "mla", "tpa", "sas"]


def tiny(variant: str) -> ModelConfig:
    args = {"mha": {"n_heads": 4}, "gqa": {"n_heads": 4, "n_kv_heads": 2}, "mqa": {"n_heads": 4},
            "mla": {"n_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                    "qk_rope_head_dim": 4, "v_head_dim": 8},
            "tpa": {"n_heads": 4}, "sas": {"n_heads": 4}}[variant]
    return ModelConfig(vocab_size=101, d_model=32, n_layers=2, max_seq_len=64, attention=variant, attention_args=args)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_loss_and_backward(variant):
    model = DecoderLM(tiny(variant))
    ids = torch.randint(0, 101, (2, 13))
    logits = model(ids)
    assert logits.shape == (2, 13, 101)
    loss = lm_loss(logits[:, :-1], ids[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(101.0)).item()) < 0.5  # near uniform at init
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tied_embeddings_and_no_biases_outside_sas():
    model = DecoderLM(tiny("mha"))
    assert model.lm_head.weight is model.embed.weight
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    untied = DecoderLM(tiny("mha").replace(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed.weight


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_matches_single_sequences(variant):
    model = DecoderLM(tiny(variant)).eval()
    a, b = torch.randint(0, 101, (1, 9)), torch.randint(0, 101, (1, 5))
    batch = torch.cat((a, torch.cat((torch.zeros(1, 4, dtype=torch.long), b), dim=1)))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        torch.testing.assert_close(out[0:1], model(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1:2, 4:], model(b), rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    model = DecoderLM(tiny("mha"))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


@pytest.mark.parametrize("attention", ["mha", "sas"])
def test_blocks_compiled_one_by_one_share_one_graph(attention):
    # as FSDP2 compiles them: the rotary tables are built before the first block, so no block differs
    from torch._dynamo.testing import CompileCounter

    from sasformer.models.presets import preset

    torch._dynamo.reset()
    config = preset("tiny", attention)
    model = DecoderLM(config)
    counter = CompileCounter()
    for block in model.blocks:
        block.compile(backend=counter)
    model(torch.randint(0, config.vocab_size, (2, 7))).sum().backward()
    assert len(model.blocks) > 1 and counter.frame_count == 1


def test_a_model_with_a_compiled_head_and_loss_still_pickles():
    import io

    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", "mha", n_layers=1))
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    targets = torch.roll(ids, -1, dims=1)
    want = model(ids, targets=targets)
    # what the trainer does under compile_scope "block"
    model.head_loss = torch.compile(model.head_loss, backend="eager")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    assert "head_loss" in vars(model) and "head_loss" not in vars(copy)  # the copy runs the plain method
    torch.testing.assert_close(copy(ids, targets=targets), want)


def test_residual_dtype_under_autocast():
    # the stream between blocks takes the given dtype; the loss stays that of the fp32 stream up to bf16 rounding
    config = preset("tiny", "mha").replace(d_model=64, n_layers=3, vocab_size=101)
    model = DecoderLM(config)
    inputs, targets = torch.randint(0, 101, (2, 9)), torch.randint(0, 101, (2, 9))
    seen = []
    model.blocks[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32_stream = model(inputs, targets=targets)
        bf16_stream = model(inputs, targets=targets, residual_dtype=torch.bfloat16)
    assert seen == [torch.float32, torch.bfloat16]
    torch.testing.assert_close(bf16_stream, fp32_stream, rtol=2e-2, atol=0)
