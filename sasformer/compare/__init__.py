"""Comparing attention variants: a grid of runs on the same data and budget, with a report and plots."""

from sasformer.compare.budget import RunBudget, iso_flops_tokens, run_budget
from sasformer.compare.report import aggregate, markdown_report, markdown_table, mean_std
from sasformer.compare.runner import RunPlan, ensure_data, execute_run, plan_runs, run_grid
from sasformer.compare.spec import BudgetSpec, DataSpec, EvalSpec, GridSpec, MQARSpec, VariantSpec, load_grid

__all__ = [
    "BudgetSpec",
    "DataSpec",
    "EvalSpec",
    "GridSpec",
    "MQARSpec",
    "RunBudget",
    "RunPlan",
    "VariantSpec",
    "aggregate",
    "ensure_data",
    "execute_run",
    "iso_flops_tokens",
    "load_grid",
    "markdown_report",
    "markdown_table",
    "mean_std",
    "plan_runs",
    "run_budget",
    "run_grid",
]
