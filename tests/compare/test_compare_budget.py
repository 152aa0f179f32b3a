from __future__ import annotations

import pytest

from sasformer.compare.budget import iso_flops_tokens, run_budget
from sasformer.compare.runner import plan_runs
from sasformer.compare.spec import BudgetSpec, GridSpec
from tests.compare.conftest import grid_dict


def test_iso_flops_tokens_is_budget_over_flops_per_token():
    assert iso_flops_tokens(1e9, 3e5) == 3333
    assert iso_flops_tokens(6e9, 3e5) == 20000
    with pytest.raises(ValueError, match="less than one token"):
        iso_flops_tokens(1.0, 3e5)


def test_run_budget_kinds():
    assert run_budget(BudgetSpec(kind="tokens", tokens=1000), 123.0).max_tokens == 1000
    timed = run_budget(BudgetSpec(kind="time", tokens=1000, seconds=30.0), 123.0)
    assert (timed.max_tokens, timed.max_time_s) == (1000, 30.0)


def test_iso_flops_plan_gives_costlier_variants_fewer_tokens(tmp_path, prepared_data):
    budget = 2e9
    grid = grid_dict(prepared_data, tmp_path / "out", seeds=(0, 1), budget={"kind": "flops", "flops": budget})
    plans = plan_runs(GridSpec.from_dict(grid), prepared_data, 300, tmp_path / "out")
    assert [p.id for p in plans] == ["mha-s0", "mha-s1", "sas-s0", "sas-s1"]
    for plan in plans:
        assert plan.budget.max_tokens == int(budget // plan.train_flops_per_token)
        assert plan.train["max_tokens"] == plan.budget.max_tokens
    mha, sas = plans[0], plans[2]
    assert sas.train_flops_per_token > mha.train_flops_per_token
    assert sas.budget.max_tokens < mha.budget.max_tokens
    assert plans[0].budget == plans[1].budget  # seeds share the budget


def test_iso_tokens_plan_gives_everyone_the_same_tokens(tmp_path, prepared_data):
    grid = grid_dict(prepared_data, tmp_path / "out")
    plans = plan_runs(GridSpec.from_dict(grid), prepared_data, 300, tmp_path / "out")
    assert {p.budget.max_tokens for p in plans} == {6 * 4 * 16}
