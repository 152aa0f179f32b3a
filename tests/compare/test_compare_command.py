from __future__ import annotations

import argparse

import pytest
import yaml

from sasformer.commands import compare
from tests.compare.conftest import grid_dict


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
