from __future__ import annotations

import math

import pytest

from sasformer.compare.report import aggregate, markdown_table, mean_std


def _run(entry: str, seed: int, loss: float | None, zero_shot: float | None = None) -> dict:
    """A finished run's result (loss None: it diverged, and has no measurements)."""
    if loss is None:
        return {"id": f"{entry}-s{seed}", "entry": entry, "attention": entry, "size": "tiny", "seed": seed,
                "params": 1000, "train_flops_per_token": 6000.0, "diverged": "loss is nan at step 2",
                "zero_shot": None}
    return {"id": f"{entry}-s{seed}", "entry": entry, "attention": entry, "size": "tiny", "seed": seed,
            "params": 1000, "train_flops_per_token": 6000.0, "tokens_seen": 512, "train_flops": 512 * 6000.0,
            "final_val_loss": loss, "final_val_ppl": math.exp(loss), "zero_shot_avg": zero_shot,
            "zero_shot": None if zero_shot is None else {"piqa": {"acc": zero_shot}},
            "mqar_accuracy": None, "tokens_per_s": 100.0 + seed, "mfu": None, "train_seconds": 5.0,
            "peak_mem_gib": None, "diverged": None}


def test_mean_std_is_sample_std():
    assert mean_std([2.0, 2.2, 2.4]) == (pytest.approx(2.2), pytest.approx(0.2))
    assert mean_std([1.0, None, 3.0]) == (pytest.approx(2.0), pytest.approx(math.sqrt(2.0)))
    assert mean_std([5.0]) == (5.0, None)
    assert mean_std([None]) == (None, None)


def test_aggregate_over_seeds():
    runs = [_run("a", 0, 2.0, 0.25), _run("b", 0, 3.0), _run("a", 1, 2.2, 0.35), _run("a", 2, 2.4, 0.45)]
    rows = aggregate(runs)
    assert [r["entry"] for r in rows] == ["a", "b"]
    a, b = rows
    assert a["seeds"] == [0, 1, 2]
    assert a["final_val_loss"] == pytest.approx(2.2) and a["final_val_loss_std"] == pytest.approx(0.2)
    ppl = [math.exp(x) for x in (2.0, 2.2, 2.4)]
    assert a["final_val_ppl"] == pytest.approx(sum(ppl) / 3)
    assert a["zero_shot_avg"] == pytest.approx(0.35) and a["zero_shot_avg_std"] == pytest.approx(0.1)
    assert a["tokens_per_s"] == pytest.approx(101.0)
    assert b["final_val_loss"] == 3.0 and b["final_val_loss_std"] is None and b["zero_shot_avg"] is None
    table = markdown_table(rows)
    assert "| a | 3 |" in table and "2.2000 ± 0.2000" in table
    assert "| b | 1 |" in table and "3.0000 |" in table and "n/a" in table


def test_zero_shot_table_shows_mean_std_and_standard_error():
    from sasformer.compare.report import zero_shot_table

    runs = [{"entry": "mha", "zero_shot": {"piqa": {"acc": 0.50, "acc_stderr": 0.02}}},
            {"entry": "mha", "zero_shot": {"piqa": {"acc": 0.54, "acc_stderr": 0.04}}},
            {"entry": "sas", "zero_shot": {"piqa": {"acc": 0.6}}}]
    table = zero_shot_table(runs).splitlines()
    assert table[2] == "| mha | 0.520 ± 0.028 (0.030) |"
    assert table[3] == "| sas | 0.600 |"


def test_provenance_lists_each_revision_and_device_the_runs_trained_at():
    from sasformer.compare.report import provenance

    def env(rev: str, device: str) -> dict:
        return {"git_revision": rev, "device": device, "torch": "2.11", "python": "3.12"}

    one = {"environment": env("aaa", "H200"), "runs": [
        {"id": "mha-s0", "environment": env("aaa", "H200")}, {"id": "sas-s0", "environment": env("aaa", "H200")}]}
    assert provenance(one) == ["Git revision: aaa; device: H200; torch 2.11, python 3.12."]
    mixed = {"environment": env("ccc", "cpu"), "runs": [
        {"id": "mha-s0", "environment": env("aaa", "H200")}, {"id": "mha-s1", "environment": env("bbb", "H200")},
        {"id": "sas-s0", "environment": env("aaa", "H200")}]}
    lines = provenance(mixed)
    assert "- Git revision: aaa; device: H200; torch 2.11, python 3.12: mha-s0, sas-s0" in lines
    assert "- Git revision: bbb; device: H200; torch 2.11, python 3.12: mha-s1" in lines
    assert not any("ccc" in line for line in lines)  # the report pass trained nothing


def test_an_entry_with_a_diverged_seed_has_no_mean_over_its_seeds():
    from sasformer.compare.report import markdown_report

    # b's seed 1 diverged; the mean of the two others (2.6) would look better than a's (2.2 is lower, but a
    # worse entry that diverged on its worst seed would rank above an entry whose every seed finished)
    runs = [_run("a", 0, 2.0, 0.3), _run("a", 1, 2.2, 0.4), _run("a", 2, 2.4, 0.5),
            _run("b", 0, 2.5, 0.3), _run("b", 1, None), _run("b", 2, 2.7, 0.5)]
    a, b = aggregate(runs)
    for key in ("final_val_loss", "final_val_ppl", "zero_shot_avg", "mqar_accuracy"):
        assert b[key] is None and b[key + "_std"] is None
    assert a["final_val_loss"] == pytest.approx(2.2) and a["survivors"] is None
    assert b["diverged"] == [1] and b["survivors"]["seeds"] == [0, 2]
    assert b["survivors"]["final_val_loss"] == pytest.approx(2.6)
    assert b["survivors"]["final_val_loss_std"] == pytest.approx(math.sqrt(0.02))
    assert b["tokens_per_s"] == pytest.approx(101.0)  # speed is over the runs that finished
    row = next(line for line in markdown_table([a, b]).splitlines() if line.startswith("| b |")).split(" | ")
    assert row[1] == "3 (1 diverged)" and row[5] == "n/a" and row[6] == "n/a" and row[7] == "n/a"
    results = {"spec": {"name": "t", "seeds": [0, 1, 2], "budget": {"kind": "tokens", "tokens": 512}},
               "val_tokens": 128, "data": {"vocab_size": 300}, "aggregates": [a, b], "runs": runs,
               "command": "sasformer compare", "environment": {}}
    report = markdown_report(results)
    assert "**Diverged seeds.**" in report
    assert "- b: 1 of 3 seeds diverged (seed 1); seeds 0, 2 reach val loss 2.6000 ± 0.1414" in report
    assert "| b | n/a |" in report  # the per-task zero-shot table too
