from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest

from sasformer.commands import frontier as frontier_command
from sasformer.compare.frontier import FrontierPoint, build_frontier, flops_for_loss, loss_at_flops
from sasformer.compare.frontier_report import markdown_frontier
from sasformer.compare.report import mean_std


def write_run(grid: Path, entry: str, seed: int, flops_per_token: float, tokens: int, loss: float | None,
              lr: float = 1e-3, metrics: list[dict] | None = None, **result) -> Path:
    """A finished run folder as `compare` leaves it: result.json (and metrics.jsonl when given)."""
    run_dir = grid / "runs" / f"{entry}-s{seed}"
    run_dir.mkdir(parents=True)
    train = {"seq_len": 8, "batch_size": 2, "optim": {"lr": lr}, "data_dir": "data/x",
             "model": {"size": "tiny", "attention": entry, "attention_args": {}},
             "out_dir": str(run_dir), "seed": seed, "max_tokens": tokens, "max_time_s": None, "progress": False}
    data = {"id": run_dir.name, "entry": entry, "attention": entry, "seed": seed,
            "train_flops_per_token": flops_per_token, "tokens_seen": tokens, "final_val_loss": loss,
            "diverged": None, "train_config": train, "model_config": {"d_model": 16}, **result}
    (run_dir / "result.json").write_text(json.dumps(data))
    if metrics is not None:
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return run_dir


def two_grids(tmp_path: Path) -> tuple[Path, Path]:
    """mha at 1e5 FLOPs (losses 2.9, 3.1) and 1e6 FLOPs (1.9, 2.1); sas at 2e5 (2.8) and 2e6 (1.5)."""
    small, large = tmp_path / "grid-small", tmp_path / "grid-large"
    write_run(small, "mha", 0, 100.0, 1000, 2.9)
    write_run(small, "mha", 1, 100.0, 1000, 3.1)
    write_run(small, "sas", 0, 200.0, 1000, 2.8)
    write_run(large, "mha", 0, 100.0, 10000, 1.9)
    write_run(large, "mha", 1, 100.0, 10000, 2.1)
    write_run(large, "sas", 0, 200.0, 10000, 1.5)
    return small, large


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sasformer")
    sub = parser.add_subparsers(dest="command", required=True)
    frontier_command.add_arguments(sub.add_parser("frontier"))
    return parser.parse_args(["frontier", *argv])


def test_points_average_seeds_per_entry_and_budget(tmp_path):
    result = build_frontier(two_grids(tmp_path))
    assert result["entries"] == ["mha", "sas"]
    mha = [p for p in result["points"] if p["entry"] == "mha"]
    assert [p["flops"] for p in mha] == [pytest.approx(1e5), pytest.approx(1e6)]
    assert [p["n"] for p in mha] == [2, 2] and mha[0]["seeds"] == [0, 1]
    assert mha[0]["loss"] == pytest.approx(3.0) and mha[1]["loss"] == pytest.approx(2.0)
    assert mha[0]["loss_std"] == pytest.approx(math.sqrt(0.02))
    sas = [p for p in result["points"] if p["entry"] == "sas"]
    assert [p["n"] for p in sas] == [1, 1] and sas[0]["loss_std"] is None
    assert result["skipped"] == [] and result["duplicates"] == [] and result["notes"] == []


def test_seeds_of_one_budget_in_two_folders_form_one_point(tmp_path):
    small, large = two_grids(tmp_path)
    more = tmp_path / "grid-small-more"
    write_run(more, "mha", 2, 100.0, 1000, 3.3)
    mha = [p for p in build_frontier([small, large, more])["points"] if p["entry"] == "mha"]
    assert mha[0]["n"] == 3 and mha[0]["seeds"] == [0, 1, 2] and mha[0]["loss"] == pytest.approx(3.1)
    assert [Path(f).name for f in mha[0]["folders"]] == ["grid-small", "grid-small-more"]


def test_seeds_of_two_attention_inits_are_not_one_point(tmp_path):
    small, large = two_grids(tmp_path)
    more = tmp_path / "grid-small-more"
    write_run(more, "mha", 2, 100.0, 1000, 3.3, attention_init="an earlier one")
    mha = [p for p in build_frontier([small, large, more])["points"] if p["entry"] == "mha"]
    assert [p["n"] for p in mha] == [2, 1, 2]


def test_interpolation_in_log_flops_matches_a_hand_computation(tmp_path):
    result = build_frontier(two_grids(tmp_path), baseline="mha")
    inside, outside = result["comparisons"]
    # sas at 2e5 FLOPs: w = ln(2e5/1e5) / ln(1e6/1e5) = log10(2); mha there = 3 - w * (3 - 2)
    w = math.log10(2.0)
    assert inside["flops"] == pytest.approx(2e5)
    assert inside["baseline_loss"] == pytest.approx(3.0 - w)
    assert inside["difference"] == pytest.approx(2.8 - (3.0 - w))
    # per seed, mha at 2e5 is 2.9 - w and 3.1 - w: their std is that of each point, sqrt(0.02), over 2 seeds
    assert inside["baseline_loss_std"] == pytest.approx(math.sqrt(0.02)) and inside["baseline_n"] == 2
    assert inside["difference_se"] is None  # sas has one seed, so no std
    # mha reaches 2.8 a fifth of the way (in loss) from 3.0 to 2.0: 10^(5 + 0.2) FLOPs
    assert inside["baseline_flops"] == pytest.approx(10 ** 5.2)
    assert inside["multiplier"] == pytest.approx(10 ** 5.2 / 2e5)
    assert inside["at_flops"] == inside["at_loss"] == "interpolated"
    # sas at 2e6 FLOPs and loss 1.5 lies beyond every mha point
    assert outside["baseline_loss"] is None and outside["difference"] is None
    assert outside["at_flops"].startswith("not bracketed")
    assert outside["baseline_flops"] is None and outside["multiplier"] is None
    assert outside["at_loss"].startswith("not bracketed")


def _point(flops: float, loss: float, std: float | None = None) -> FrontierPoint:
    return FrontierPoint("a", "a", 1, [0], [], [], 0.0, flops, loss, std, None, [loss])


def _seeds_point(flops: float, losses: dict[int, float]) -> FrontierPoint:
    """A point of several seeds, each with its own loss."""
    seeds = sorted(losses)
    mean, std = mean_std([losses[s] for s in seeds])
    return FrontierPoint("a", "a", len(seeds), seeds, [], [], 0.0, flops, mean, std, None,
                         [losses[s] for s in seeds])


def test_interpolation_helpers_never_extrapolate():
    points = [_point(1e6, 2.0), _point(1e4, 4.0)]
    assert loss_at_flops(points, 1e5) == (pytest.approx(3.0), None, 0)
    assert loss_at_flops(points, 1e4) == (4.0, None, 0)
    assert loss_at_flops(points, 9e3) is None and loss_at_flops(points, 1.1e6) is None
    assert loss_at_flops(points[:1], 1e6) == (2.0, None, 0) and loss_at_flops(points[:1], 2e6) is None
    assert flops_for_loss(points, 3.0) == pytest.approx(1e5)
    assert flops_for_loss(points, 4.5) is None and flops_for_loss(points, 1.5) is None
    # losses that rise again: the lowest-FLOPs crossing counts
    wiggly = [_point(1e4, 4.0), _point(1e5, 2.0), _point(1e6, 3.0)]
    assert flops_for_loss(wiggly, 3.0) == pytest.approx(10 ** 4.5)


def test_the_std_at_interpolated_flops_is_the_std_of_each_seeds_interpolated_loss():
    # halfway in log(FLOPs) between 1e4 and 1e6; each point has std sqrt(0.02) over seeds 0 and 1
    low = _seeds_point(1e4, {0: 3.9, 1: 4.1})
    # seed 0 is lower at both budgets: halfway, each seed sits 0.1 off the mean, as at either budget
    same = loss_at_flops([low, _seeds_point(1e6, {0: 1.9, 1: 2.1})], 1e5)
    assert same == (pytest.approx(3.0), pytest.approx(math.sqrt(0.02)), 2)
    # seed 0 is lower at one budget and higher at the other: halfway, both seeds are at 3.0
    crossed = loss_at_flops([low, _seeds_point(1e6, {0: 2.1, 1: 1.9})], 1e5)
    assert crossed == (pytest.approx(3.0), pytest.approx(0.0, abs=1e-12), 2)
    # (an interpolated std, sqrt(0.25 + 0.25) * sqrt(0.02) = 0.1, would be wrong both times)
    # only the seeds both points hold pair up; with fewer than two there is no std
    partly = loss_at_flops([_seeds_point(1e4, {0: 3.9, 1: 4.1, 2: 4.3}), _seeds_point(1e6, {0: 1.9, 1: 2.1})], 1e5)
    assert partly.std == pytest.approx(math.sqrt(0.02)) and partly.n == 2
    apart = loss_at_flops([_seeds_point(1e4, {0: 3.9, 1: 4.1}), _seeds_point(1e6, {2: 1.9, 3: 2.1})], 1e5)
    assert apart.loss == pytest.approx(3.0) and apart.std is None and apart.n == 0


def test_a_difference_carries_the_standard_error_of_both_means(tmp_path):
    small, large = two_grids(tmp_path)
    write_run(small, "sas", 1, 200.0, 1000, 3.0)  # sas at 2e5 FLOPs: 2.8 and 3.0
    inside = build_frontier([small, large], baseline="mha")["comparisons"][0]
    w = math.log10(2.0)
    assert inside["loss"] == pytest.approx(2.9) and inside["difference"] == pytest.approx(2.9 - (3.0 - w))
    # both have std sqrt(0.02) over 2 seeds: sqrt(0.02 / 2 + 0.02 / 2)
    assert inside["difference_se"] == pytest.approx(math.sqrt(0.02))
    report = markdown_frontier({**build_frontier([small, large]), "command": "", "git_revision": None})
    assert "| difference ± s.e. |" in report and "standard error" in report


def test_the_same_run_copied_counts_once_and_another_budget_does_not(tmp_path):
    small, large = two_grids(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(small, copy)
    result = build_frontier([small, large, copy])
    mha = [p for p in result["points"] if p["entry"] == "mha"]
    # same ids in grid-large (another max_tokens) stay separate points; the copy adds nothing
    assert [p["n"] for p in mha] == [2, 2]
    assert {d["id"] for d in result["duplicates"]} == {"mha-s0", "mha-s1", "sas-s0"}
    assert all(d["run_dir"].startswith(str(copy)) for d in result["duplicates"])


def test_runs_that_cannot_be_points_are_listed_with_the_reason(tmp_path):
    small, large = two_grids(tmp_path)
    (small / "runs" / "mha-s2").mkdir()
    write_run(small, "mha", 3, 100.0, 1000, None)
    write_run(small, "sas", 4, 200.0, 1000, None, diverged="loss is nan at step 3")
    (small / "runs" / "sas-s5").mkdir()
    (small / "runs" / "sas-s5" / "result.json").write_text("{not json")
    write_run(small, "gqa", 0, 100.0, 1000, None)
    result = build_frontier([small, large], only=["mha", "sas"])
    reasons = {Path(s["run_dir"]).name: s["reason"] for s in result["skipped"]}
    assert reasons["mha-s2"] == "not finished: no result.json"
    assert reasons["mha-s3"] == "result.json lacks final_val_loss"
    assert reasons["sas-s4"] == "diverged: loss is nan at step 3"
    assert reasons["sas-s5"].startswith("result.json is unreadable")
    assert "gqa-s0" not in reasons  # an entry left out by --only
    assert [p["n"] for p in result["points"] if p["entry"] == "mha"] == [2, 2]


def test_curves_come_from_metrics_and_epochs_from_the_grid_results(tmp_path):
    grid = tmp_path / "grid"
    metrics = [{"kind": "val", "step": 0, "val_loss": 7.0},
               {"kind": "train", "step": 2, "tokens": 32, "loss": 5.0},
               {"kind": "val", "step": 2, "val_loss": 5.5},
               {"kind": "val", "step": 2, "val_loss": 5.25},  # logged again after a resume: the last wins
               {"kind": "train", "step": 4, "tokens": 64, "loss": 4.0},
               {"kind": "val", "step": 4, "val_loss": 4.5}]
    write_run(grid, "mha", 0, 10.0, 64, 4.5, metrics=metrics)
    (grid / "results.json").write_text(json.dumps({"data": {"dir": "data/x", "train_tokens": 256},
                                                   "spec": {"budget": {"kind": "tokens", "tokens": 64}}}))
    result = build_frontier([grid])
    assert result["runs"][0]["curve"] == [[2 * 16 * 10.0, 5.25], [4 * 16 * 10.0, 4.5]]
    assert result["points"][0]["epochs"] == pytest.approx(0.25)
    assert result["comparisons"] == []


def test_runs_folders_and_single_runs_are_accepted(tmp_path):
    small, large = two_grids(tmp_path)
    result = build_frontier([small / "runs", large / "runs" / "sas-s0"])
    assert [f["kind"] for f in result["folders"]] == ["runs", "run"]
    assert len(result["runs"]) == 4


def test_settings_that_differ_beyond_the_budget_are_noted(tmp_path):
    grid = tmp_path / "grid"
    write_run(grid, "mha", 0, 100.0, 1000, 3.0)
    write_run(grid, "sas", 0, 100.0, 1000, 2.9, lr=2e-3)
    notes = build_frontier([grid])["notes"]
    assert notes == ["the entries differ in more than attention and budget: ['optim.lr']"]


def test_runs_without_a_training_config_are_grouped_by_budget_and_noted(tmp_path):
    grid = tmp_path / "grid"
    for seed, tokens, loss in ((0, 1000, 3.0), (1, 1000, 3.2), (0, 10000, 2.0)):
        run_dir = write_run(grid / str(tokens), "mha", seed, 100.0, tokens, loss)
        result = json.loads((run_dir / "result.json").read_text())
        del result["train_config"]
        result["budget"] = {"max_tokens": tokens, "max_time_s": None}
        (run_dir / "result.json").write_text(json.dumps(result))
    result = build_frontier([grid / "1000", grid / "10000"])
    assert [(p["n"], p["loss"]) for p in result["points"]] == [(2, pytest.approx(3.1)), (1, 2.0)]
    assert len(result["notes"]) == 1 and result["notes"][0].startswith("no training config in ")


def test_a_baseline_whose_loss_rises_with_compute_is_noted(tmp_path):
    grid = tmp_path / "grid"
    write_run(grid, "mha", 0, 100.0, 1000, 3.0)
    write_run(grid / "more", "mha", 0, 100.0, 2000, 3.1)
    notes = build_frontier([grid, grid / "more"])["notes"]
    assert len(notes) == 1 and notes[0].startswith("mha's final loss does not fall with every step up in FLOPs")


def test_errors_name_what_to_fix(tmp_path):
    small, large = two_grids(tmp_path)
    with pytest.raises(ValueError, match="no folder given"):
        frontier_command.run(_parse(["--out", str(tmp_path / "out")]))
    with pytest.raises(ValueError, match="no such folder"):
        build_frontier([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a grid folder"):
        build_frontier([tmp_path / "empty"])
    (tmp_path / "unfinished" / "runs" / "mha-s0").mkdir(parents=True)
    with pytest.raises(ValueError, match="no finished runs.*not finished"):
        build_frontier([tmp_path / "unfinished"])
    with pytest.raises(ValueError, match=r"--only: no finished runs of \['gqa'\]; the folders hold \['mha', 'sas'\]"):
        build_frontier([small, large], only=["mha", "gqa"])
    with pytest.raises(ValueError, match="--baseline 'mqa'"):
        build_frontier([small, large], baseline="mqa")
    with pytest.raises(ValueError, match="add it to --only"):
        build_frontier([small, large], only=["sas"], baseline="mha")
    with pytest.raises(ValueError, match="names no entry"):
        frontier_command.run(_parse([str(small), "--out", str(tmp_path / "out"), "--only", ","]))


def test_command_writes_the_report(tmp_path, capsys):
    small, large = two_grids(tmp_path)
    (small / "runs" / "mha-s9").mkdir()
    out = tmp_path / "out"
    assert frontier_command.run(_parse([str(small), str(large), "--out", str(out), "--only", "sas,mha"])) == 0
    printed = capsys.readouterr().out
    assert "| sas | 2.000e+05 | 2.8000 | 2.6990 ± 0.1414 | +0.1010 | 1.585e+05 | 0.792x |" in printed
    assert "| sas | 2.000e+06 | 1.5000 | not bracketed | n/a | not bracketed | n/a |" in printed
    assert "skipped" in printed and "mha-s9" in printed
    report = (out / "frontier.md").read_text()
    assert f"`{small.resolve()}` (grid, budget unknown): 3 of 4 runs finished" in report
    assert "| mha | 1.000e+05 | 1k | n/a | 2 | 3.0000 ± 0.1414 | grid-small |" in report
    assert "not bracketed: the baseline's points span 1.000e+05 to 1.000e+06 FLOPs" in report
    assert "mha-s9`: not finished" in report
    data = json.loads((out / "frontier.json").read_text())
    assert data["entries"] == ["sas", "mha"] and data["command"].endswith("--only sas,mha --baseline mha")


def test_plot_is_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert frontier_command.run(_parse([*map(str, two_grids(tmp_path)), "--out", str(out)])) == 0
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Plot: `frontier.png`" in (out / "frontier.md").read_text()


def test_entries_past_ten_keep_distinct_styles():
    pytest.importorskip("matplotlib")
    from sasformer.compare.plots import entry_styles

    names = [f"entry{i}" for i in range(25)]
    styles = entry_styles(names)
    assert len({(s["color"], s["linestyle"], s["marker"]) for s in styles.values()}) == 25
    # the first ten keep the plain solid look of a small grid
    assert {styles[n]["linestyle"] for n in names[:10]} == {"-"}


def test_log_flops_axis_labels_minor_ticks_at_two_and_five_only():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sasformer.compare.plots import log_x_axis

    fig, ax = plt.subplots()
    ax.plot([2e15, 8e16], [3.0, 2.2])
    log_x_axis(ax)
    fig.canvas.draw()
    labelled = {round(t.get_loc() / 10 ** math.floor(math.log10(t.get_loc())), 6)
                for t in ax.xaxis.get_minor_ticks() if t.label1.get_text() and ax.get_xlim()[0] <= t.get_loc()}
    plt.close(fig)
    assert labelled == {2, 5}, labelled  # matplotlib's own formatter also labels 3, 4 and 6 here
