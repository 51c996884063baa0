"""Typed recipes: precedence, type checks, unknown keys, every problem reported at once."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from peqa_cli.config import dump_yaml, load_config
from peqa_cli.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-4
    steps: int = 10
    name: str = "x"


@dataclass
class Outer:
    model: str = ""
    mode: str = field(default="a", metadata={"choices": ("a", "b")})
    tags: list[str] = field(default_factory=list)
    flag: bool = False
    inner: Inner = field(default_factory=Inner)

    def validate(self) -> list[str]:
        return ["inner.lr: must be > 0"] if self.inner.lr <= 0 else []


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_precedence_defaults_yaml_overrides_flags(tmp_path):
    p = write(tmp_path, "model: m1\ninner:\n  lr: 0.5\n  steps: 3\n")
    cfg = load_config(Outer, p, ["inner.steps=7", "model=007"], {"inner.lr": 0.25, "flag": None})
    assert cfg.model == "007"  # a string field keeps the raw text
    assert cfg.inner.steps == 7 and cfg.inner.lr == 0.25 and cfg.inner.name == "x"
    assert cfg.flag is False
    assert "steps: 7" in dump_yaml(cfg)


def test_int_promotes_to_float_and_scalar_to_list():
    cfg = load_config(Outer, None, ["inner.lr=1", "tags=one"])
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.tags == ["one"]


def test_all_problems_reported_together(tmp_path):
    p = write(tmp_path, "modle: x\ninner:\n  steps: ten\n  lr: -1\nmode: c\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Outer, p, ["flag=maybe", "inner.nope=1"])
    msg = str(exc.value)
    for part in (
        "unknown key 'modle'",
        "inner.steps: expected an integer",
        "mode: 'c' is not allowed",
        "flag: expected true or false",
        "unknown key 'inner.nope'",
        "inner.lr: must be > 0",
    ):
        assert part in msg, part
    assert str(p) in msg and "\n" not in msg


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "model: a\ninner: [1, 2\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: YAML syntax error at line \d+"):
        load_config(Outer, p)


def test_missing_recipe_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Outer, write(tmp_path, "- a\n- b\n"))


def test_override_without_equals():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(Outer, None, ["inner.lr"])
