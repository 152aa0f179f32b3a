from __future__ import annotations

import pytest

from sasformer.commands.compare import parse_overrides
from sasformer.compare.spec import GridSpec, load_grid
from tests.compare.conftest import grid_dict


def _grid(tmp_path, **changes) -> dict:
    grid = grid_dict(tmp_path / "data", tmp_path / "out")
    grid.update(changes)
    return grid


@pytest.mark.parametrize("change, message", [
    ({"seed": [0]}, r"\['seed'\]"),
    ({"budget": {"kind": "tokens", "token": 5}}, r"budget\.token"),
    ({"budget": {"kind": "flops", "tokens": 5}}, r"budget\.flops"),
    ({"budget": {"kind": "time", "seconds": 5}}, r"budget\.tokens"),
    ({"budget": {"kind": "steps", "tokens": 5}}, r"budget\.kind"),
    ({"train": {"max_steps": 5}}, r"train\.max_steps is set by the grid"),
    ({"train": {"lr": 1e-3}}, r"train\.lr"),
    ({"model": {"d_modle": 32}}, r"model\.d_modle"),
    ({"variants": [{"name": "a", "attention": "mha", "heads": 2}]}, r"variants\[0\]\.heads"),
    ({"variants": [{"name": "a", "attention": "mha", "model": {"layers": 2}}]}, r"variants\[0\]\.model\.layers"),
    ({"variants": ["mha", "mha"]}, r"unique"),
    ({"variants": [{"name": "bad/name", "attention": "mha"}]}, r"folder"),
    ({"eval": {"mqar": {"enabled": True, "stepz": 3}}}, r"eval\.mqar\.stepz"),
    ({"data": {"dir": "x", "inputs": ["default"]}}, r"data\.vocab_size"),
    ({"seeds": [0, 0]}, r"repeats"),
    ({"sizes": ["huge"]}, r"sizes"),
])
def test_bad_grid_is_a_clear_error(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        GridSpec.from_dict(_grid(tmp_path, **change))


def test_unknown_attention_argument_names_the_entry(tmp_path, prepared_data):
    from sasformer.compare.runner import plan_runs

    grid = _grid(tmp_path, variants=[{"name": "odd", "attention": "sas", "attention_args": {"n_heads": 2, "x": 1}}])
    spec = GridSpec.from_dict(grid)
    with pytest.raises(ValueError, match=r"'odd'.*unknown key"):
        plan_runs(spec, prepared_data, 300, tmp_path / "out")


def test_variant_shorthand_and_sizes(tmp_path):
    spec = GridSpec.from_dict(_grid(tmp_path, variants=["mha", "sas"], sizes=["tiny", "small"]))
    assert [v.attention for v in spec.variants] == ["mha", "sas"]
    assert [name for name, _, _ in spec.entries()] == ["mha@tiny", "sas@tiny", "mha@small", "sas@small"]


def test_load_grid_applies_dotted_overrides(tmp_path):
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(_grid(tmp_path)))
    spec = load_grid(path, parse_overrides(["--budget.tokens", "2e3", "--seeds=[1,2]", "--train.optim.lr", "1e-3"]))
    assert spec.budget.tokens == 2000 and isinstance(spec.budget.tokens, int)
    assert spec.seeds == [1, 2]
    assert spec.train["optim"]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="does not exist"):
        load_grid(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="--KEY VALUE"):
        parse_overrides(["budget.tokens", "5"])


def test_override_through_a_list_is_a_clear_error(tmp_path):
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(_grid(tmp_path)))
    with pytest.raises(ValueError, match="cannot set variants.0.name"):
        load_grid(path, {"variants.0.name": "x"})
    spec = load_grid(path, {"variants": ["mqa"]})
    assert [v.name for v in spec.variants] == ["mqa"]


@pytest.mark.parametrize("name", ["compare_tiny", "compare_small", "compare_mini"])
def test_shipped_grids_load_and_build(name):
    from pathlib import Path

    from sasformer.models.decoder import DecoderLM
    from sasformer.models.presets import preset

    spec = load_grid(Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml")
    for entry in spec.variants:
        size = entry.model.get("size", spec.model.get("size"))
        config = preset(size, entry.attention, attention_args=dict(entry.attention_args), n_layers=1,
                        vocab_size=64)
        DecoderLM(config)  # builds the variant with its arguments (an invalid one raises here)
