import math

import pytest
from eval_fakes import CharTokenizer, bigram, unigram

from sasformer.eval.tasks import ChoiceItem, ClozeItem
from sasformer.eval.zeroshot import RequestBuilder, evaluate_items, mean_and_stderr

TOK = CharTokenizer()
V = TOK.vocab_size
G, H = TOK.encode("gh")


def test_mean_and_stderr():
    mean, se = mean_and_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75
    assert se == pytest.approx(math.sqrt((3 * 0.25**2 + 0.75**2) / 3 / 4))


def test_accuracy_is_exact_on_forced_scores():
    # the model prefers "g" over everything: the choice made of most g's per byte and fewest tokens wins
    model = unigram({G: 0.5, H: 0.25}, V)
    items = [
        ChoiceItem("0", (("q", "g"), ("q", "a")), gold=0),  # g wins: correct
        ChoiceItem("1", (("q", "a"), ("q", "g"), ("q", "b")), gold=1),  # correct
        ChoiceItem("2", (("q", "g"), ("q", "h")), gold=1),  # g wins, gold is h: wrong
        ChoiceItem("3", (("q", "b"), ("q", "h")), gold=1),  # correct
    ]
    result = evaluate_items(model, TOK, items, max_len=32)
    assert result["n"] == 4
    assert result["acc"] == 0.75
    assert result["acc_stderr"] == pytest.approx(mean_and_stderr([1, 1, 0, 1])[1])


def test_acc_norm_differs_from_acc_when_lengths_differ():
    # "h": log .25 in total and per byte; "ggg": 3 log .5 < log .25 in total, but log .5 per byte
    model = unigram({G: 0.5, H: 0.25}, V)
    items = [ChoiceItem("0", (("q", "h"), ("q", "ggg")), gold=1)]
    result = evaluate_items(model, TOK, items, max_len=32)
    assert result["acc"] == 0.0
    assert result["acc_norm"] == 1.0


def test_acc_norm_counts_the_choice_without_its_separating_space():
    # per byte of the choice alone (as lm-eval): " hh" scores (log .2 + 2 log .25) / 2 > (log .2 + log .5) / 1 for
    # " g"; counting the space too would reverse it ((...) / 3 < (...) / 2)
    (space,) = TOK.encode(" ")
    model = unigram({G: 0.5, H: 0.25, space: 0.2}, V)
    items = [ChoiceItem("0", (("q", " hh"), ("q", " g")), gold=0)]
    result = evaluate_items(model, TOK, items, max_len=32)
    assert result["acc"] == 0.0
    assert result["acc_norm"] == 1.0


def test_winogrande_shape_scores_the_shared_continuation_after_each_context():
    # after "x" the model expects " ", after "y" it does not: the context ending in x wins
    x, y, space = TOK.encode("xy ")
    model = bigram(V, {x: {space: 4.0}, y: {space: -4.0}})
    items = [
        ChoiceItem("0", (("the y", " ok"), ("the x", " ok")), gold=1),
        ChoiceItem("1", (("the x", " ok"), ("the y", " ok")), gold=1),
    ]
    result = evaluate_items(model, TOK, items, max_len=32)
    assert result["acc"] == 0.5
    assert "acc_norm" not in result  # one shared continuation: acc_norm would repeat acc


def test_lambada_greedy_match_and_perplexity():
    b, space, c, d = TOK.encode("b cd")
    model = bigram(V, {b: {space: 6.0}, space: {c: 6.0}, c: {d: 6.0}})
    items = [ClozeItem("0", "ab", " cd"), ClozeItem("1", "ab", " ce")]
    result = evaluate_items(model, TOK, items, max_len=32)
    assert result["acc"] == 0.5
    top = math.log(math.exp(6.0) / (math.exp(6.0) + V - 1))
    low = math.log(1 / (math.exp(6.0) + V - 1))
    logprobs = [3 * top, 2 * top + low]
    assert result["ppl"] == pytest.approx(math.exp(-sum(logprobs) / 2), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(-sum(logprobs) / (math.log(2) * 6), rel=1e-5)


def test_request_builder_moves_trailing_space_and_uses_eot_for_empty_context():
    build = RequestBuilder(TOK)
    r = build("ab ", "c")
    assert r.context == tuple(TOK.encode("ab")) and r.continuation == tuple(TOK.encode(" c"))
    assert build("", "c").context == (TOK.eot_id,)


def test_mixed_item_shapes_are_rejected():
    with pytest.raises(ValueError, match="mixes"):
        evaluate_items(unigram({}, V), TOK, [ClozeItem("0", "a", "b"), ChoiceItem("1", (("a", "b"), ("a", "c")), 0)], 8)


def test_empty_context_without_eot_and_empty_continuation_are_errors():
    class NoEot:
        def encode(self, text):
            return TOK.encode(text)

    with pytest.raises(ValueError, match="no eot_id"):
        RequestBuilder(NoEot())("", "a")
    with pytest.raises(ValueError, match="encodes to no tokens"):
        RequestBuilder(TOK)("a", "")
