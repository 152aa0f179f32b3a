"""Two CPU processes (gloo) train like one with the same global batch, under DDP and FSDP2, and
their checkpoints resume on one process (and one process's on two)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from conftest import tiny_config
from fakes import FakeData

from sasformer.train.metrics import read_metrics
from sasformer.train.trainer import Trainer

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, changes: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from sasformer.train import distributed

    try:
        trainer = Trainer(tiny_config(out_dir, max_steps=STEPS, checkpoint_interval=3, **changes), FakeData())
        trainer.fit()
        if rank == 0:  # what was compiled, for the tests to read
            from torch._dynamo.utils import counters

            model = trainer.model
            compiled = {"blocks": all(b._compiled_call_impl is not None for b in model.blocks),
                        "head_loss": "head_loss" in vars(model),
                        "graph_breaks": sum(counters["graph_break"].values()),
                        "graphs": counters["stats"]["unique_graphs"]}
            (Path(out_dir) / "compiled.json").write_text(json.dumps(compiled))
    finally:
        distributed.shutdown()


SPAWN_TIMEOUT_S = 300  # a collective that never completes fails the test instead of stalling the suite


def _spawn(out_dir: Path, **changes) -> None:
    _run_two(_worker, str(out_dir), changes)


def _run_two(worker, *args) -> None:
    """``worker(rank, world_size, port, *args)`` on two processes; a failure in either fails the test."""
    context = mp.spawn(worker, args=(2, _free_port(), *args), nprocs=2, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):  # raises if a process failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two training processes did not finish within {SPAWN_TIMEOUT_S} s")


def _losses(out_dir: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out_dir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("one_process")
    Trainer(tiny_config(out_dir, max_steps=STEPS, checkpoint_interval=3), FakeData()).fit()
    return out_dir


def _assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert got.keys() == want.keys() and got
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-4, abs=1e-5), step


def test_ddp_two_processes_resume_a_one_process_checkpoint(tmp_path, reference):
    # micro-batch 1 per process: 2 accumulation steps, the first under no_sync
    out_dir = tmp_path / "ddp"
    _spawn(out_dir, parallel="ddp", micro_batch_size=1, resume=str(reference / "checkpoints" / "step_000003"))
    want = {s: v for s, v in _losses(reference).items() if s > 3}
    _assert_close(_losses(out_dir), want)


def test_fsdp_two_processes_match_one_and_resume_on_one(tmp_path, reference):
    # micro-batch 1 per process: 2 accumulation steps, each reduce-scattered
    out_dir = tmp_path / "fsdp"
    _spawn(out_dir, parallel="fsdp", micro_batch_size=1)
    _assert_close(_losses(out_dir), _losses(reference))
    # the norm from local shards (one all-reduce) is the one-process norm (clipping at 1.0 is active)
    _assert_close(_losses(out_dir, "grad_norm"), _losses(reference, "grad_norm"))
    assert max(_losses(reference, "grad_norm").values()) > 1.0
    # the sharded run's checkpoint continues on a single process
    single = tmp_path / "single"
    trainer = Trainer(tiny_config(single, max_steps=STEPS, checkpoint_interval=3,
                                  resume=str(out_dir / "checkpoints" / "step_000003")), FakeData())
    assert trainer.step == 3
    trainer.fit()
    _assert_close(_losses(single), {s: v for s, v in _losses(reference).items() if s > 3})


@pytest.mark.parametrize("changes", [{"parallel": "fsdp"}, {"parallel": "ddp", "compile_scope": "block"}],
                         ids=["fsdp", "ddp-blocks"])
def test_blocks_compiled_one_by_one_match_one_process(tmp_path, reference, changes):
    # FSDP2 compiles block by block (its hooks run outside the compiled code), and so does DDP under
    # compile_scope block (its gradient hooks work through the compiled blocks): no graph breaks, one graph
    # shared by the blocks and one for the head and loss, over all steps (a recompilation per step or per
    # block would add graphs)
    out_dir = tmp_path / "compiled"
    _spawn(out_dir, compile=True, **changes)
    assert json.loads((out_dir / "compiled.json").read_text()) == {"blocks": True, "head_loss": True,
                                                                     "graph_breaks": 0, "graphs": 2}
    _assert_close(_losses(out_dir), _losses(reference))
    _assert_close(_losses(out_dir, "grad_norm"), _losses(reference, "grad_norm"))


def test_ddp_compiles_the_model_whole_without_graph_breaks(tmp_path, reference):
    # the model is compiled inside DDP: Dynamo never traces DDP's forward (compiled around DDP, it broke the
    # graph three times there and ran it eagerly); DDP's bucket splits are not graph breaks
    out_dir = tmp_path / "ddp_compiled"
    _spawn(out_dir, compile=True, parallel="ddp")
    compiled = json.loads((out_dir / "compiled.json").read_text())
    assert compiled["graph_breaks"] == 0 and compiled["graphs"] >= 1
    record = read_metrics(out_dir / "metrics.jsonl", kind="compile")
    assert record == [] or (record[0]["graph_breaks"]["count"] == 0 and not record[0]["graph_breaks"]["eager_frames"])
    _assert_close(_losses(out_dir), _losses(reference))


def test_fsdp_without_resharding_matches_one_process(tmp_path, reference):
    out_dir = tmp_path / "fsdp_zero2"
    _spawn(out_dir, parallel="fsdp", fsdp_reshard_after_forward=False)
    _assert_close(_losses(out_dir), _losses(reference))


@pytest.mark.parametrize("blocks_per_unit", [2, 0])
def test_fsdp_with_larger_units_matches_one_process(tmp_path, reference, blocks_per_unit):
    out_dir = tmp_path / f"fsdp_units_{blocks_per_unit}"
    _spawn(out_dir, parallel="fsdp", fsdp_blocks_per_unit=blocks_per_unit)
    _assert_close(_losses(out_dir), _losses(reference))


def test_fsdp_under_bf16_autocast_keeps_the_arithmetic_of_ddp_unless_told_otherwise(tmp_path):
    # fsdp_param_dtype float32 (the default): fp32 parameters gathered, autocast casting per op, as under DDP;
    # compute: bf16 parameters gathered (FSDP2's mixed precision), so the embeddings, norms and residual
    # stream run in bf16 and the losses differ
    runs = {"ddp": {"parallel": "ddp"}, "float32": {"parallel": "fsdp"},
            "compute": {"parallel": "fsdp", "fsdp_param_dtype": "compute"}}
    losses = {}
    for name, changes in runs.items():
        _spawn(tmp_path / name, micro_batch_size=1, dtype="bfloat16", **changes)
        losses[name] = _losses(tmp_path / name)
    assert losses["float32"].keys() == losses["ddp"].keys() == losses["compute"].keys() and losses["ddp"]
    # the first loss comes before any update, so it is the forward's arithmetic alone: equal bit for bit with
    # fp32 parameters gathered, not with bf16 ones
    first = min(losses["ddp"])
    assert losses["float32"][first] == losses["ddp"][first]
    assert losses["compute"][first] != losses["ddp"][first]
    # later losses also carry the gradient reduction (reduce-scatter against all-reduce), whose summation order
    # may round differently in the last bits, which bf16 autocast then magnifies (4e-6 by the sixth step on one
    # CPU, 0 on another): close, as the bf16 run is, on this tiny model
    _assert_close(losses["float32"], losses["ddp"])
    _assert_close(losses["compute"], losses["ddp"])


def _fake_fully_shard(calls: list, prefetches: list):
    """Records fully_shard's calls, and gives the modules the prefetch setter FSDP2 would."""
    def fully_shard(module, **kw):
        calls.append((module, kw))
        for m in module if isinstance(module, list) else [module]:
            m.set_modules_to_forward_prefetch = lambda following, m=m: prefetches.append((m, following))

    return fully_shard


def test_apply_fsdp_groups_blocks_into_units_and_prefetches_the_next(monkeypatch):
    import torch.distributed.fsdp as fsdp
    from torch import nn

    from sasformer.train import distributed
    from sasformer.train.distributed import apply_fsdp

    calls, prefetches = [], []
    monkeypatch.setattr(fsdp, "fully_shard", _fake_fully_shard(calls, prefetches))
    blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(5))
    root = nn.Sequential(*blocks)
    apply_fsdp(root, blocks, None, blocks_per_unit=2)
    assert [m if isinstance(m, list) else [m] for m, _ in calls[:3]] == [[blocks[0], blocks[1]],
                                                                        [blocks[2], blocks[3]], [blocks[4]]]
    assert [kw["reshard_after_forward"] for _, kw in calls[:3]] == [True, True, False]
    assert calls[3][0] is root and len(calls) == 4
    # forward order: the root (embedding) prefetches the first unit, each unit the next
    assert prefetches == [(root, [blocks[0]]), (blocks[0], [blocks[2]]), (blocks[2], [blocks[4]])]
    calls.clear()
    prefetches.clear()
    apply_fsdp(root, blocks, None, blocks_per_unit=0)  # the whole model one unit
    assert [m for m, _ in calls] == [root] and prefetches == []
    monkeypatch.setattr(distributed, "FORWARD_PREFETCH", False)
    apply_fsdp(root, blocks, None, blocks_per_unit=1)
    assert prefetches == []
    with pytest.raises(ValueError, match="blocks_per_unit"):
        apply_fsdp(root, blocks, None, blocks_per_unit=-1)


def test_negative_blocks_per_unit_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="fsdp_blocks_per_unit"):
        tiny_config(tmp_path, fsdp_blocks_per_unit=-1)


@pytest.mark.parametrize("reshard", [True, False])
def test_apply_fsdp_reshards_blocks_as_configured(monkeypatch, reshard):
    import torch
    import torch.distributed.fsdp as fsdp
    from torch import nn

    from sasformer.train.distributed import apply_fsdp

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", _fake_fully_shard(calls, []))
    blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    root = nn.Sequential(*blocks)
    apply_fsdp(root, blocks, torch.bfloat16, reshard_after_forward=reshard)
    # the last block is never resharded: backward needs it at once
    assert [kw["reshard_after_forward"] for _, kw in calls[:3]] == [reshard, reshard, False]
    assert calls[3][0] is root and "reshard_after_forward" not in calls[3][1]
    assert all(kw["mp_policy"].param_dtype == torch.bfloat16 for _, kw in calls)


def _local_step_worker(rank: int, world_size: int, port: int) -> None:
    """Asserts, on each of two gloo processes, that the local-shard clipping and AdamW step of
    ``sasformer.train.distributed`` equal DTensor's own dispatch and one process's arithmetic."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from sasformer.train import distributed as D
    from sasformer.train.optim import param_groups

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        def build() -> nn.Module:
            # odd row counts: uneven shards, and a 1-row weight whose second shard is empty
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3), nn.LayerNorm(3), nn.Linear(3, 1))

        one, ours, theirs = build(), build(), build()
        for model in (ours, theirs):
            fully_shard(model[0])
            fully_shard(model)
        x = torch.randn(2 * world_size, 5, generator=torch.Generator().manual_seed(1))

        def backward(model: nn.Module, rows: torch.Tensor) -> None:
            model.zero_grad(set_to_none=True)
            (model(rows) ** 2).mean().backward()

        def adamw(model: nn.Module) -> torch.optim.AdamW:
            return torch.optim.AdamW(param_groups(model, 0.1), lr=0.05, foreach=True)

        opt_one, opt_ours, opt_theirs = adamw(one), adamw(ours), adamw(theirs)
        for step in range(3):
            backward(one, x)  # the global batch: FSDP averages the processes' gradients
            backward(ours, x[rank::world_size])
            backward(theirs, x[rank::world_size])
            max_norm = 0.05 if step < 2 else 1e9  # clipping active, then not
            norm_one = torch.nn.utils.clip_grad_norm_(one.parameters(), max_norm, foreach=True)
            norm_theirs = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm, foreach=True).full_tensor()
            norm_ours = D.clip_grad_norm_(ours.parameters(), max_norm)
            assert type(norm_ours) is torch.Tensor and norm_ours.shape == ()
            torch.testing.assert_close(norm_ours, norm_theirs, rtol=1e-6, atol=0)
            torch.testing.assert_close(norm_ours, norm_one, rtol=1e-5, atol=0)
            for p_ours, p_theirs, p_one in zip(ours.parameters(), theirs.parameters(), one.parameters()):
                torch.testing.assert_close(p_ours.grad.to_local(), p_theirs.grad.to_local(), rtol=1e-6, atol=1e-9)
                torch.testing.assert_close(p_ours.grad.full_tensor(), p_one.grad, rtol=1e-5, atol=1e-7)
                p_ours.grad.to_local().copy_(p_theirs.grad.to_local())  # the same gradients into the step
            for opt in (opt_ours, opt_theirs, opt_one):
                opt.step()
        for p_ours, p_one in zip(ours.parameters(), one.parameters()):
            torch.testing.assert_close(p_ours.full_tensor(), p_one, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_local_shard_clipping_equals_dtensor_dispatch_and_one_process():
    _run_two(_local_step_worker)


def _resume_choice_worker(rank: int, world_size: int, port: int, views: dict[str, list[str]], results: str) -> None:
    """Builds a resuming trainer on each of two processes, each working in its own copy of ``run`` (as nodes
    with their own filesystems); writes each scenario's outcome on this rank to ``results``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from sasformer.train import distributed

    outcomes = {}
    try:
        for scenario, directories in views.items():
            os.chdir(directories[rank])
            try:
                trainer = Trainer(tiny_config(Path("run"), max_steps=16), FakeData())
                outcomes[scenario] = {"step": trainer.step, "resumed_from": str(trainer.resumed_from)}
            except ValueError as error:
                outcomes[scenario] = {"error": str(error)}
        (Path(results) / f"{rank}.json").write_text(json.dumps(outcomes))
    finally:
        distributed.shutdown()


def test_rank_0_chooses_the_checkpoint_every_rank_resumes_from(tmp_path):
    source = tmp_path / "source"
    Trainer(tiny_config(source, max_steps=12, keep_last=3), FakeData()).fit()  # steps 4, 8 and 12

    def view(name: str, steps: list[int]) -> str:
        for step in steps:
            shutil.copytree(source / "checkpoints" / f"step_{step:06d}", tmp_path / name / "run" / "checkpoints" /
                            f"step_{step:06d}")
        return str(tmp_path / name)

    views = {
        # rank 1 lists a checkpoint rank 0 did not see (written between their listings): rank 0's choice holds
        "later": [view("later0", [4, 8]), view("later1", [4, 8, 12])],
        # rank 1 does not see rank 0's choice (another filesystem): every rank stops, naming it
        "blind": [view("blind0", [4, 8]), view("blind1", [4])],
    }
    results = tmp_path / "results"
    results.mkdir()
    _run_two(_resume_choice_worker, views, str(results))
    outcomes = [json.loads((results / f"{rank}.json").read_text()) for rank in (0, 1)]
    want = {"step": 8, "resumed_from": str(Path("run") / "checkpoints" / "step_000008")}
    assert [o["later"] for o in outcomes] == [want, want]
    for o in outcomes:
        assert "rank(s) [1] cannot find complete" in o["blind"].get("error", ""), o["blind"]
