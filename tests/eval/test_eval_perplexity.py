import math

import pytest
import torch
import torch.nn.functional as F
from eval_fakes import CharTokenizer, bigram

from sasformer import DecoderLM, ModelConfig
from sasformer.eval.perplexity import bits_per_byte, evaluate_perplexity, evaluate_window_batches, windows


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        return torch.zeros(*input_ids.shape, self.vocab)


def test_uniform_model_has_perplexity_vocab_size_at_every_length():
    tok = CharTokenizer()
    tokens = torch.randint(0, tok.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
    results = evaluate_perplexity(Uniform(tok.vocab_size), tokens, seq_len=7, decode=tok.decode)
    assert [r.seq_len for r in results] == [7, 14, 28]
    for r in results:
        assert r.n_tokens == 196  # 199 predictable tokens cut to a multiple of 28
        assert r.perplexity == pytest.approx(tok.vocab_size, rel=1e-5)
        assert r.loss == pytest.approx(math.log(tok.vocab_size), rel=1e-6)
        # one byte per character token
        assert r.n_bytes == 196
        assert r.bits_per_byte == pytest.approx(math.log2(tok.vocab_size), rel=1e-5)


def test_bits_per_byte_formula_and_ratio():
    assert bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="n_bytes"):
        bits_per_byte(1.0, 0)
    tokens = list(range(5)) * 20
    (r,) = evaluate_perplexity(Uniform(8), tokens, seq_len=9, multipliers=(1,), bytes_per_token=2.0)
    assert r.bits_per_byte == pytest.approx(math.log2(8) / 2, rel=1e-5)


def test_windows_predict_every_token_once():
    tokens = torch.arange(64)
    w = windows(tokens, 7)
    assert w.shape == (9, 8)
    assert torch.equal(w[:, 1:].flatten(), tokens[1:64])
    assert torch.equal(w[:, :-1].flatten(), tokens[:63])


def test_bigram_model_matches_direct_cross_entropy():
    model = bigram(11, {i: {(i + 1) % 11: 2.0} for i in range(11)})
    tokens = torch.randint(0, 11, (130,), generator=torch.Generator().manual_seed(1))
    results = evaluate_perplexity(model, tokens, seq_len=8, multipliers=(1, 4), batch_size=3)
    ref = F.cross_entropy(model.log_probs_VV[tokens[:128]], tokens[1:129])
    for r in results:
        assert r.loss == pytest.approx(float(ref), rel=1e-5)
        assert r.bits_per_byte is None


def test_decoder_loss_matches_manual_windows():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=19, d_model=16, n_layers=1, max_seq_len=16, attention="mha",
                                  attention_args={"n_heads": 2})).eval()
    tokens = torch.randint(0, 19, (64,))
    results = evaluate_perplexity(model, tokens, seq_len=7, multipliers=(1, 3), batch_size=2)
    span = 63 // 21 * 21
    for r, length in zip(results, (7, 21)):
        x = tokens[: span + 1]
        with torch.no_grad():
            losses = [F.cross_entropy(model(x[i: i + length][None])[0], x[i + 1: i + length + 1], reduction="sum")
                      for i in range(0, span, length)]
        assert r.loss == pytest.approx(float(sum(losses)) / span, rel=1e-5)
    assert results[0].loss != results[1].loss


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one window of 28"):
        evaluate_perplexity(Uniform(4), list(range(20)), seq_len=7)


def test_window_batches_match_the_token_stream_path():
    tok = CharTokenizer()
    model = bigram(tok.vocab_size, {i: {(i * 7) % tok.vocab_size: 3.0} for i in range(tok.vocab_size)})
    tokens = torch.randint(0, tok.vocab_size, (64,), generator=torch.Generator().manual_seed(2))
    (expected,) = evaluate_perplexity(model, tokens, seq_len=9, multipliers=(1,), decode=tok.decode)
    w = windows(tokens, 9)
    as_tensor = evaluate_window_batches(model, w.split(2), 9, decode=tok.decode)
    as_pairs = evaluate_window_batches(model, [(b[:, :-1], b[:, 1:]) for b in w.split(3)], 9, decode=tok.decode)
    for got in (as_tensor, as_pairs):
        assert got.n_tokens == expected.n_tokens == 63
        assert got.loss == pytest.approx(expected.loss, rel=1e-6)
        assert got.bits_per_byte == pytest.approx(expected.bits_per_byte, rel=1e-6)
    with pytest.raises(ValueError, match="cannot read a batch"):
        evaluate_window_batches(model, ["x"], 9)
