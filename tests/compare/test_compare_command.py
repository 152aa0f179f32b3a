from __future__ import annotations

import argparse
import json
import math

import pytest
import yaml

from sasformer.commands import compare
from sasformer.compare.spec import GridSpec
from tests.compare.conftest import grid_dict, write_finished_runs


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse as ``sasformer compare ...`` does: a sub-command parser built by the command module."""
    parser = argparse.ArgumentParser(prog="sasformer")
    sub = parser.add_subparsers(dest="command", required=True)
    compare.add_arguments(sub.add_parser("compare"))
    return parser.parse_args(["compare", *argv])


def test_command_runs_the_grid_and_prints_the_table(tmp_path, prepared_data, capsys):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid_dict(prepared_data, tmp_path / "unused", variants=["mha", "mqa"])))
    out = tmp_path / "grid"
    args = _parse(["--config", str(config), "--out", str(out), "--budget.tokens", "128", "--variants", "[mha]"])
    assert compare.run(args) == 0
    printed = capsys.readouterr().out
    assert "| mha | 1 |" in printed and "mqa" not in printed
    assert str(out / "results.md") in printed
    results = yaml.safe_load((out / "results.json").read_text())
    assert results["runs"][0]["tokens_seen"] == 128
    assert results["command"].endswith("--budget.tokens 128 --variants '[mha]'")


def test_plan_lists_runs_without_training(tmp_path, prepared_data, capsys):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid_dict(prepared_data, tmp_path / "grid", seeds=(0, 1))))
    args = _parse(["--config", str(config), "--plan", "--budget.kind", "flops", "--budget.flops", "1e9"])
    assert compare.run(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "-s" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| mha-s0", "| mha-s1", "| sas-s0", "| sas-s1"]
    assert not (tmp_path / "grid").exists()


def test_command_rejects_unknown_keys(tmp_path, prepared_data):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid_dict(prepared_data, tmp_path / "grid")))
    with pytest.raises(ValueError, match=r"budget\.tokenz"):
        compare.run(_parse(["--config", str(config), "--budget.tokenz", "5"]))
    with pytest.raises(ValueError, match="--budget.tokens needs a value"):
        compare.run(_parse(["--config", str(config), "--budget.tokens"]))
    with pytest.raises(ValueError, match="--KEY VALUE"):
        compare.run(_parse(["--config", str(config), "--budget.tokens", "5", "stray"]))


def test_only_runs_the_named_entries_and_report_lists_the_rest(tmp_path, prepared_data, capsys):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid_dict(prepared_data, tmp_path / "unused")))
    out = tmp_path / "grid"
    assert compare.run(_parse(["--config", str(config), "--out", str(out), "--only", "sas"])) == 0
    assert [r["id"] for r in yaml.safe_load((out / "results.json").read_text())["runs"]] == ["sas-s0"]
    capsys.readouterr()

    assert compare.run(_parse(["--config", str(config), "--out", str(out), "--report"])) == 0
    assert "not run yet (left out of the tables): mha-s0" in capsys.readouterr().out
    results = yaml.safe_load((out / "results.json").read_text())
    assert [r["id"] for r in results["runs"]] == ["sas-s0"] and results["missing_runs"] == ["mha-s0"]
    assert not (out / "runs" / "mha-s0").exists()


def test_only_rejects_unknown_entry_names(tmp_path, prepared_data):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid_dict(prepared_data, tmp_path / "grid")))
    with pytest.raises(ValueError, match=r"unknown entry name\(s\) \['gqa'\]"):
        compare.run(_parse(["--config", str(config), "--only", "mha,gqa"]))


def _no_preparing(monkeypatch) -> None:
    import importlib

    def refuse(options):
        raise AssertionError(f"--report prepared {options.out}")

    # the module, not the function that sasformer.data re-exports under the same name
    monkeypatch.setattr(importlib.import_module("sasformer.data.prepare"), "prepare", refuse)


def test_report_reads_the_finished_runs_without_the_data(tmp_path, monkeypatch, capsys):
    grid = grid_dict(tmp_path / "gone", tmp_path / "grid", seeds=(0, 1))
    # neither the inputs nor the prepared folder exist any more
    grid["data"] = {"dir": str(tmp_path / "gone"), "inputs": [str(tmp_path / "corpus.txt")], "vocab_size": 300}
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid))
    write_finished_runs(GridSpec.from_dict(grid), tmp_path / "grid", 300, {"sas-s0": 2.8, "sas-s1": 3.0})
    _no_preparing(monkeypatch)
    assert compare.run(_parse(["--config", str(config), "--report"])) == 0
    assert "| sas | 2 |" in capsys.readouterr().out
    results = yaml.safe_load((tmp_path / "grid" / "results.json").read_text())
    # a model's vocabulary is the tokenizer's padded: the report does not take it for the tokenizer's
    assert results["runs"][0]["model_config"]["vocab_size"] == 320
    assert results["data"]["vocab_size"] is None and results["data"]["padded_vocab_size"] == 320
    assert results["val_tokens"] is None
    assert len(results["runs"]) == 4 and results["missing_runs"] == []
    report = (tmp_path / "grid" / "results.md").read_text()
    assert "Validation: the same windows for every run" in report and "2.9000 ± 0.1414" in report
    assert "ln(" not in report and "embeddings have 320 rows, padded" in report


def test_report_without_the_data_takes_the_vocabulary_the_runs_recorded(tmp_path, monkeypatch):
    grid = grid_dict(tmp_path / "gone", tmp_path / "grid")
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid))
    write_finished_runs(GridSpec.from_dict(grid), tmp_path / "grid", 300, data_vocab_size=300)
    _no_preparing(monkeypatch)
    assert compare.run(_parse(["--config", str(config), "--report"])) == 0
    results = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert results["data"]["vocab_size"] == 300
    assert f"ln(300) = {math.log(300):.3f}" in (tmp_path / "grid" / "results.md").read_text()


def test_report_reads_a_prepared_folder_without_preparing_it(tmp_path, prepared_data, monkeypatch):
    grid = grid_dict(prepared_data, tmp_path / "grid")
    grid["data"] = {"dir": str(prepared_data), "inputs": [str(tmp_path / "corpus.txt")], "vocab_size": 300}
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid))
    write_finished_runs(GridSpec.from_dict(grid), tmp_path / "grid", 300)
    _no_preparing(monkeypatch)
    assert compare.run(_parse(["--config", str(config), "--report"])) == 0
    results = yaml.safe_load((tmp_path / "grid" / "results.json").read_text())
    assert results["val_tokens"] == 2 * 4 * 16 and results["data"]["tokenizer_fingerprint"]


def test_runs_of_an_earlier_attention_init_are_listed_in_a_report_and_refused_for_training(tmp_path, prepared_data,
                                                                                          capsys):
    grid = grid_dict(prepared_data, tmp_path / "grid", seeds=(0,))
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid))
    write_finished_runs(GridSpec.from_dict(grid), tmp_path / "grid", 300)
    earlier = tmp_path / "grid" / "runs" / "sas-s0" / "result.json"
    result = json.loads(earlier.read_text())
    result["attention_init"] = "an earlier one"
    earlier.write_text(json.dumps(result))

    assert compare.run(_parse(["--config", str(config), "--report"])) == 0
    assert "Trained with an earlier initialisation of their attention layer (in the table" in capsys.readouterr().out
    results = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert results["earlier_init_runs"] == ["sas-s0"] and len(results["runs"]) == 2
    assert "**Trained with an earlier initialisation" in (tmp_path / "grid" / "results.md").read_text()
    with pytest.raises(ValueError, match="trained with an earlier initialisation of sas"):
        compare.run(_parse(["--config", str(config)]))


def test_report_keeps_a_grid_whose_runs_all_share_the_old_rule(tmp_path, prepared_data, capsys):
    """Runs that all share the old rule compare with each other: the report tabulates them (not an empty table)."""
    grid = grid_dict(prepared_data, tmp_path / "grid", seeds=(0,))
    grid["train"]["micro_batch_size"] = 2
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid))
    for result in write_finished_runs(GridSpec.from_dict(grid), tmp_path / "grid", 300, {"mha-s0": 3.25}):
        del result["validation_rule"]  # all made before the rule was recorded, with micro-batches
        (tmp_path / "grid" / "runs" / result["id"] / "result.json").write_text(json.dumps(result))

    assert compare.run(_parse(["--config", str(config), "--report"])) == 0
    assert "Every run in the table was validated under the old rule (" in capsys.readouterr().out
    results = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert [r["id"] for r in results["runs"]] == ["mha-s0", "sas-s0"] and results["old_validation_rule_runs"] == []
    assert [a["entry"] for a in results["aggregates"]] == ["mha", "sas"]
    report = (tmp_path / "grid" / "results.md").read_text()
    assert "**Every run in the table was validated under the old rule**" in report and "3.2500" in report
    # the present rule's token count is not theirs
    assert results["val_tokens"] is None and "Validation: the same windows for every run" in report


def test_report_sets_apart_runs_of_the_old_validation_rule(tmp_path, prepared_data, capsys):
    grid = grid_dict(prepared_data, tmp_path / "grid", seeds=(0, 1))
    grid["train"]["micro_batch_size"] = 2  # validation windows that the old rule chose differently
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid))
    write_finished_runs(GridSpec.from_dict(grid), tmp_path / "grid", 300, {"mha-s1": 3.5})
    old = tmp_path / "grid" / "runs" / "mha-s1" / "result.json"
    result = json.loads(old.read_text())
    del result["validation_rule"]  # made before the rule was recorded, with micro-batches: the old rule
    old.write_text(json.dumps(result))

    assert compare.run(_parse(["--config", str(config), "--report"])) == 0
    printed = capsys.readouterr().out
    assert "Measured under the old validation rule (" in printed and printed.count("mha-s1") == 1
    assert "| mha | 1 |" in printed
    results = yaml.safe_load((tmp_path / "grid" / "results.json").read_text())
    assert [r["id"] for r in results["runs"]] == ["mha-s0", "sas-s0", "sas-s1"]
    assert [r["id"] for r in results["old_validation_rule_runs"]] == ["mha-s1"] and results["missing_runs"] == []
    report = (tmp_path / "grid" / "results.md").read_text()
    assert "**Measured under the old validation rule**" in report and "mha-s1 (val loss 3.5000)" in report
    # training next to them is still refused: a run of the grid would be compared with them
    with pytest.raises(ValueError, match="validated on eval_batches x micro_batch_size windows"):
        compare.run(_parse(["--config", str(config)]))
