"""lm-eval's stock ``HFLM`` on a saved sasformer model (no fork, no trust_remote_code)."""

from __future__ import annotations

import argparse

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from tests.models.hf_fixtures import tiny_decoder, write_tokenizer_json, write_training_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from sasformer.commands import export

    root = tmp_path_factory.mktemp("lm_eval")
    decoder = tiny_decoder("sas-compact", tie=True)
    ckpt = write_training_checkpoint(decoder, root / "ckpt")
    tokenizer = write_tokenizer_json(root / "tok.json")
    export.run(argparse.Namespace(checkpoint=str(ckpt), out=str(root / "hf"), tokenizer=str(tokenizer), dtype=None))
    return decoder, root / "hf"


def _instance(request_type: str, arguments: tuple, idx: int):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=arguments, idx=idx)


@torch.no_grad()
def test_hflm_loglikelihood_matches_the_model(exported) -> None:
    from lm_eval.models.huggingface import HFLM

    from sasformer.models.hf import register

    register()
    decoder, path = exported
    lm = HFLM(pretrained=str(path), backend="causal", device="cpu", batch_size=2, dtype="float32")
    pairs = [("the cat", " sat on the mat"), ("a dog ran", " far away"), ("the", " dog")]
    results = lm.loglikelihood([_instance("loglikelihood", p, i) for i, p in enumerate(pairs)])
    vocab = {"the": 2, "cat": 3, "sat": 4, "on": 5, "mat": 6, "a": 7, "dog": 8, "ran": 9, "far": 10, "away": 11}
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        ctx = [vocab[w] for w in context.split()]
        cont = [vocab[w] for w in continuation.split()]
        ids = torch.tensor([ctx + cont])
        logp = torch.log_softmax(decoder(ids)[0, :-1].double(), dim=-1)
        targets = ids[0, 1:]
        expected = logp[len(ctx) - 1 :].gather(-1, targets[len(ctx) - 1 :, None]).sum().item()
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((logp[len(ctx) - 1 :].argmax(-1) == targets[len(ctx) - 1 :]).all())


@torch.no_grad()
def test_hflm_generate_until_runs_greedy_with_our_cache(exported) -> None:
    from lm_eval.models.huggingface import HFLM

    from sasformer.generation import generate
    from sasformer.models.hf import register

    register()
    decoder, path = exported
    lm = HFLM(pretrained=str(path), backend="causal", device="cpu", batch_size=1, dtype="float32")
    options = {"until": ["<|never|>"], "max_gen_toks": 5, "do_sample": False}
    request = _instance("generate_until", ("the cat sat", options), 0)
    (text,) = lm.generate_until([request])
    expected = generate(decoder, torch.tensor([[2, 3, 4]]), 5, temperature=0.0)[0, 3:].tolist()
    assert text.split() == [lm.tokenizer.convert_ids_to_tokens(i) for i in expected]
