"""sasformer.utils.graph_breaks counts what torch.compile did, and the speed benchmarks report it."""

from __future__ import annotations

import inspect
import json
import sys
import types

import pytest
import torch

from benchmarks import sas_speed, train_check, train_speed
from sasformer.layers.mha import MultiHeadAttention
from sasformer.utils import graph_breaks
from sasformer.utils.graph_breaks import GraphBreakError, GraphBreaks, watch_graph_breaks


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def broken(x: torch.Tensor) -> torch.Tensor:
    y = x.sin()
    torch._dynamo.graph_break()
    return y.cos()


def branching(x: torch.Tensor) -> torch.Tensor:
    if x.sum() > 0:  # data-dependent: Dynamo must break here
        return x + 1
    return x - 1


def clean(x: torch.Tensor) -> torch.Tensor:
    return x.sin().cos() * 2


def test_counts_a_deliberate_break_with_its_reason_and_place():
    compiled = torch.compile(broken, backend="eager")
    with watch_graph_breaks() as breaks:
        compiled(torch.randn(7))
        compiled(torch.randn(7))  # cached: no new break
    assert breaks.count == 1
    [(reason, n)] = breaks.reasons.items()
    assert n == 1
    assert "graph_break()" in reason
    line = inspect.getsourcelines(broken)[1] + 2
    assert reason.endswith(f"test_graph_breaks.py:{line})"), reason
    assert not breaks.clean
    assert "1 graph break" in breaks.warning("broken") and "graph_break()" in breaks.warning("broken")
    with pytest.raises(GraphBreakError, match="broken: 1 graph break"):
        breaks.check("broken")


def test_clean_function_counts_zero():
    compiled = torch.compile(clean, backend="eager")
    with watch_graph_breaks() as breaks:
        compiled(torch.randn(7))
    assert (breaks.count, breaks.reasons, breaks.recompiles, breaks.eager_frames) == (0, {}, 0, 0)
    assert breaks.clean and breaks.summary() == "0"
    breaks.check("clean")


def test_data_dependent_branching_counts():
    # torch 2.13's counters["graph_break"] misses this one; the reasons list has it
    with watch_graph_breaks() as breaks:
        torch.compile(branching, backend="eager")(torch.randn(7))
    assert breaks.count == 1
    assert list(breaks.reasons)[0].endswith(f"test_graph_breaks.py:{inspect.getsourcelines(branching)[1] + 1})")


def test_recompilations_count_without_breaks():
    compiled = torch.compile(clean, backend="eager", dynamic=False)
    with watch_graph_breaks() as breaks:
        for n in (1, 7, 63):
            compiled(torch.randn(n))
    assert breaks.count == 0 and breaks.recompiles == 2
    assert not breaks.clean and breaks.summary() == "0 (2 recompiles)"


def test_only_the_block_counts():
    compiled = torch.compile(broken, backend="eager")
    compiled(torch.randn(7))  # compiled (and broken) before the block
    with watch_graph_breaks() as breaks:
        compiled(torch.randn(7))
        torch.compile(clean, backend="eager")(torch.randn(7))
    assert breaks.count == 0


def test_reset_inside_the_block():
    torch.compile(broken, backend="eager")(torch.randn(7))  # one break recorded before the block
    with watch_graph_breaks() as breaks:
        torch._dynamo.reset()  # empties Dynamo's list of reasons
        torch.compile(broken, backend="eager")(torch.randn(7))
    assert breaks.count == 1


def test_filled_when_the_block_raises():
    with pytest.raises(ValueError), watch_graph_breaks() as breaks:
        torch.compile(broken, backend="eager")(torch.randn(7))
        raise ValueError("after the compilation")
    assert breaks.count == 1


def test_falls_back_to_counters_then_unknown(monkeypatch):
    monkeypatch.delattr(torch._dynamo.utils, "graph_break_reasons")
    with watch_graph_breaks() as breaks:
        torch.compile(broken, backend="eager")(torch.randn(7))
    assert breaks.count == 1
    [reason] = breaks.reasons
    assert "graph_break()" in reason and "(at " not in reason
    monkeypatch.delattr(torch._dynamo.utils, "counters")
    monkeypatch.delattr(torch._dynamo.convert_frame, "FRAME_COMPILE_COUNTER")
    with watch_graph_breaks() as unknown:
        pass
    assert (unknown.count, unknown.recompiles, unknown.eager_frames) == (None, None, None)
    assert unknown.summary() == "unknown" and not unknown.clean
    assert "unknown" in unknown.warning("step")
    with pytest.raises(GraphBreakError, match="unknown"):
        unknown.check("step")


def test_short_reason():
    long = "Failed to trace builtin operator\n  Explanation: Dynamo does not know " + "x" * 300 + "\n  Hint: h"
    short = graph_breaks.short_reason(long)
    assert short.startswith("Failed to trace builtin operator: Dynamo does not know x")
    assert short.endswith("...") and len(short) < 220 and "Hint" not in short
    assert graph_breaks.short_reason("generic_jump TensorVariable()") == "generic_jump TensorVariable()"


BROKEN = GraphBreaks(count=12, reasons={"Attempted to call function marked as skipped: builtin (at sas.py:9)": 12},
                     recompiles=1, eager_frames=0).to_dict()
CLEAN = GraphBreaks(count=0, reasons={}, recompiles=0, eager_frames=0).to_dict()


def _train_row(attention: str, breaks: dict | None) -> dict:
    return {"attention": attention, "parameters": 124e6, "world_size": 1, "micro_batch_size": 32, "seq_len": 1024,
            "grad_accum": 1, "loss_impl": "chunked", "step_ms": 500.0, "host_ms": 20.0, "tokens_per_s": 65536.0,
            "tflops": 400.0, "mfu": 0.4, "peak_mem_gib": 30.0, "batch_size": 32, "graph_breaks": breaks}


def test_train_speed_reports_graph_breaks(capsys):
    meta = {"device": "H200", "dtype": "bfloat16", "compile": True, "command": "python3 train_speed.py",
            "git_revision": "abc", "torch": "2.11", "peak_tflops": 989.0, "compile_mode": "default",
            "loss_impl": "chunked", "loss_chunk_size": 8192, "attention_backend": "auto"}
    rows = [_train_row("mha", CLEAN), _train_row("sas", BROKEN)]
    text = train_speed.markdown(rows, meta)
    header, _, mha, sas = text.split("\n")[5:9]
    assert header.endswith("| graph breaks |")
    assert mha.endswith("| 0 |") and sas.endswith("| **12 (1 recompile)** |")
    assert "- sas, batch 32: 12 graph breaks, 1 recompilation" in text
    assert "  - 12x Attempted to call function marked as skipped: builtin (at sas.py:9)" in text
    assert train_speed.failed_on_graph_breaks(rows)
    assert "sas, batch 32: 12 graph breaks" in capsys.readouterr().err
    assert not train_speed.failed_on_graph_breaks(rows[:1])
    eager = train_speed.markdown([_train_row("mha", None)], {**meta, "compile": False})
    assert eager.split("\n")[7].endswith("| n/a |") and "did not make one clean graph" not in eager
    assert "did not make one clean graph" not in train_speed.markdown(rows[:1], meta)
    # switches set in the environment are part of the command a reader would repeat
    assert "Command: `python3 train_speed.py`" in text
    with_env = train_speed.markdown(rows, {**meta, "environment": {"SASFORMER_SIMULATE": "blocked"}})
    assert "Command: `SASFORMER_SIMULATE=blocked python3 train_speed.py`" in with_env


def test_warning_line():
    assert graph_breaks.warning_line("sas", CLEAN) is None and graph_breaks.warning_line("sas", None) is None
    assert graph_breaks.warning_line("sas", BROKEN).startswith("WARNING: sas: 12 graph breaks, 1 recompilation;")


def test_sas_speed_reports_graph_breaks():
    row = {"B": 16, "T": 1024, "step_ms": 100.0, "tokens_per_s": 163840.0, "peak_gib": 20.0, "params": 124e6}
    res = {"environment": {"command": "sas_speed.py", "gpu": "H200", "torch": "2.11", "triton": "3.6",
                           "cuda": "12.8", "git_rev": "abc", "date_utc": "today"},
           "model": {"simulation_impl": "banded", "T1024/eager/sas_24x128": row,
                     "T1024/compiled/mha": {**row, "graph_breaks": CLEAN},
                     "T1024/compiled/sas_24x128": {**row, "graph_breaks": BROKEN}}}
    lines = sas_speed.markdown(res).split("\n")
    table = [line for line in lines if line.startswith("| 1024 |")]
    assert [line.rsplit("|", 2)[1].strip() for line in table] == ["n/a", "0", "**12 (1 recompile)**"]
    assert "- T1024/compiled/sas_24x128: 12 graph breaks, 1 recompilation" in lines
    assert sas_speed.failed_on_graph_breaks(res["model"])
    del res["model"]["T1024/compiled/sas_24x128"]
    assert not sas_speed.failed_on_graph_breaks(res["model"])
    # the layer section's compiled rows count as well, with their own column
    layer = {"fwd_ms": 1.0, "fwd_bwd_ms": 3.0, "peak_gib": 0.5}
    res["layer"] = {"sas_24x128/T1024": {"B": 16, "T": 1024, "banded": layer,
                                         "banded compiled": {**layer, "graph_breaks": CLEAN}}}
    assert not sas_speed.any_graph_breaks(res)
    res["layer"]["sas_24x128/T1024"]["banded compiled"]["graph_breaks"] = BROKEN
    assert sas_speed.any_graph_breaks(res)
    rows = [line for line in sas_speed.markdown(res).split("\n") if line.startswith("| sas_24x128/T1024 |")]
    assert [line.rsplit("|", 2)[1].strip() for line in rows] == ["n/a", "**12 (1 recompile)**"]


@pytest.fixture()
def broken_attention(monkeypatch):
    """Every MHA layer breaks the graph, and torch.compile traces without Inductor (fast on a CPU)."""
    forward, compile_ = MultiHeadAttention.forward, torch.compile

    def breaking_forward(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MultiHeadAttention, "forward", breaking_forward)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, backend="eager"))


def test_train_speed_run_records_breaks(broken_attention, tmp_path, monkeypatch, capsys):
    argv = ["train_speed.py", "--out", str(tmp_path), "--attention", "mha", "--size", "tiny", "--seq-len", "7",
            "--batch-size", "2", "--vocab-size", "97", "--warmup", "1", "--steps", "1", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    assert train_speed.main() == 0
    [row] = json.loads((tmp_path / "train_speed.json").read_text())["rows"]
    assert row["graph_breaks"]["count"] >= 2  # one per layer at least
    assert all("graph_break()" in reason for reason in row["graph_breaks"]["reasons"])
    out = capsys.readouterr().out
    assert "WARNING: mha, batch 2: " in out and "did not make one clean graph" in out
    monkeypatch.setattr(sys, "argv", [*argv, "--fail-on-graph-break"])
    assert train_speed.main() == 1
    monkeypatch.setenv("SASFORMER_SIMULATE", "naive")
    monkeypatch.setattr(sys, "argv", [*argv, "--no-compile", "--fail-on-graph-break"])
    assert train_speed.main() == 0
    result = json.loads((tmp_path / "train_speed.json").read_text())
    assert result["rows"][0]["graph_breaks"] is None
    assert result["meta"]["environment"] == {"SASFORMER_SIMULATE": "naive"}


def test_sas_speed_compiled_rows_record_breaks(broken_attention, monkeypatch):
    monkeypatch.setattr(sas_speed, "DEV", "cpu")
    opts = types.SimpleNamespace(seq_lens=[7], tokens_per_step=14, modes=["eager", "compiled"], variants=["mha"],
                                 compiled_variants=["mha"], size="tiny", steps=1)
    out = sas_speed.section_model(opts, {}, float("inf"), {}, lambda: None)
    assert "graph_breaks" not in out["T7/eager/mha"]
    breaks = out["T7/compiled/mha"]["graph_breaks"]
    assert breaks["count"] >= 2 and all("graph_break()" in reason for reason in breaks["reasons"])
    assert sas_speed.failed_on_graph_breaks(out)


def test_train_check_reports_breaks_beside_the_gradients(broken_attention, tmp_path, monkeypatch, capsys):
    # a broken graph once cost a compiled model its gradients (right loss, wrong gradients), so the
    # gradient check names the breaks of every compiled setting
    argv = ["train_check.py", "--out", str(tmp_path), "--attention", "mha", "--size", "tiny", "--layers", "1",
            "--batch", "2", "--device", "cpu", "--settings", "compiled bf16, eager backend"]
    monkeypatch.setattr(sys, "argv", argv)
    for name in train_check.ENV_VARS:  # the check sets them per setting; restored after the test
        monkeypatch.setenv(name, "")
    with pytest.raises(SystemExit) as verdict:
        train_check.main()
    assert verdict.value.code == 0  # the gradients pass: breaks are reported, not judged
    settings = json.loads((tmp_path / "train_check.json").read_text())["mha"]["settings"]
    assert settings["eager bf16, auto paths"]["graph_breaks"] is None
    breaks = settings["compiled bf16, eager backend"]["graph_breaks"]
    assert breaks["count"] >= 1 and all("graph_break()" in reason for reason in breaks["reasons"])
    text = (tmp_path / "train_check.md").read_text()
    eager_row, compiled_row = (line for line in text.split("\n") if line.startswith(("| eager", "| compiled")))
    assert eager_row.endswith("| n/a |") and compiled_row.rsplit("|", 2)[1].strip().startswith("**")
    assert "the gradients above are those of the broken graphs" in text.replace("\n", " ")
    assert "WARNING: mha, compiled bf16, eager backend: " in capsys.readouterr().out
