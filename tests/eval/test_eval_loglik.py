import math
import random

import pytest
import torch
from eval_fakes import bigram

from sasformer import DecoderLM, ModelConfig
from sasformer.eval.loglik import Request, score_requests


def tiny_model(vocab: int = 37) -> DecoderLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, max_seq_len=64, attention="mha",
                         attention_args={"n_heads": 4})
    return DecoderLM(config).eval()


def random_requests(n: int, vocab: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ctx = tuple(rng.randrange(vocab) for _ in range(rng.choice([1, 2, 7, 30, 63])))
        cont = tuple(rng.randrange(vocab) for _ in range(rng.choice([1, 3, 7])))
        out.append(Request(ctx, cont))
    return out


def direct_score(model, request: Request, max_len: int) -> tuple[float, bool]:
    """Reference: one unpadded forward on the (left-truncated) concatenation."""
    full = list(request.context) + list(request.continuation)
    row = full[-(max_len + 1):-1]
    n = len(request.continuation)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([row]))[0].double(), -1)[-n:]
    target = torch.tensor(request.continuation)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


@pytest.mark.parametrize("max_len", [63, 8])
def test_batched_scores_equal_one_at_a_time(max_len):
    model = tiny_model()
    requests = random_requests(13, 37)
    batched = score_requests(model, requests, max_len=max_len, batch_size=5)
    single = [score_requests(model, [r], max_len=max_len, batch_size=1)[0] for r in requests]
    for b, s, r in zip(batched, single, requests):
        assert b.n_tokens == s.n_tokens == len(r.continuation)
        assert b.logprob == pytest.approx(s.logprob, abs=1e-4)
        assert b.greedy == s.greedy
        ref, greedy = direct_score(model, r, max_len)
        assert b.logprob == pytest.approx(ref, abs=1e-4)
        assert b.greedy == greedy


def test_truncation_keeps_the_rightmost_tokens():
    model = tiny_model()
    long = Request(tuple(range(1, 31)), (5, 6))
    cut = Request(tuple(range(31 - 9, 31)), (5, 6))  # exactly max_len + 1 - 2 context tokens survive
    a, b = score_requests(model, [long, cut], max_len=10)
    assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_greedy_flag_and_value_on_a_bigram_model():
    # after token 1 the model prefers 2, after 2 it prefers 3
    model = bigram(6, {1: {2: 5.0}, 2: {3: 5.0}})
    p_top = math.exp(5.0) / (math.exp(5.0) + 5)
    p_other = 1 / (math.exp(5.0) + 5)
    hit, miss = score_requests(model, [Request((0, 1), (2, 3)), Request((0, 1), (2, 4))], max_len=16)
    assert hit.greedy and not miss.greedy
    assert hit.logprob == pytest.approx(2 * math.log(p_top), rel=1e-5)
    assert miss.logprob == pytest.approx(math.log(p_top) + math.log(p_other), rel=1e-5)


@pytest.mark.parametrize("request_, message", [
    (Request((), (1,)), "context is empty"),
    (Request((1,), ()), "continuation is empty"),
    (Request((1,), (1, 2, 3)), "does not fit"),
])
def test_bad_requests_are_rejected(request_, message):
    with pytest.raises(ValueError, match=message):
        score_requests(bigram(4), [request_], max_len=2)
