"""DataConfig.validate collects every problem; val_count turns val_size into a count."""

from __future__ import annotations

import pytest

from peqa_cli.data.config import DataConfig, val_count


def test_defaults_are_valid():
    assert DataConfig().validate() == []
    assert DataConfig(path="x.jsonl").validate(require_path=True) == []


def test_empty_path_only_a_problem_when_required():
    assert DataConfig().validate(require_path=True) == [
        "data.path is empty; give a .json/.jsonl/.txt file or a dataset id"
    ]


def test_every_problem_is_reported_at_once():
    cfg = DataConfig(format="csv", max_length=0, val_size=-1, limit=-3, split="", packing="yes")
    problems = cfg.validate()
    joined = "\n".join(problems)
    assert len(problems) == 6, problems
    for needle in ("format", "max_length", "val_size", "limit", "split", "packing"):
        assert f"data.{needle}" in joined
    assert "'csv'" in joined


@pytest.mark.parametrize(
    "val_size, ok",
    [(0.0, True), (0.1, True), (5, True), (5.0, True), (2.5, False), (-0.1, False), ("x", False)],
)
def test_val_size_fraction_or_whole_count(val_size, ok):
    assert (DataConfig(val_size=val_size).validate() == []) is ok


def test_val_path_and_val_size_conflict():
    problems = DataConfig(val_path="v.jsonl", val_size=0.1).validate()
    assert len(problems) == 1 and "val_path" in problems[0]


def test_prefix_is_configurable():
    assert DataConfig(max_length=-1).validate(prefix="")[0].startswith("max_length")


def test_val_count():
    assert val_count(0, 100) == 0
    assert val_count(0.1, 100) == 10
    assert val_count(0.001, 100) == 1  # a fraction never rounds to "no validation"
    assert val_count(7, 100) == 7
    assert val_count(7.0, 100) == 7
