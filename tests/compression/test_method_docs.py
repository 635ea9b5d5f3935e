"""Methods a user can discover: `modelpress methods`, and the README reference, from the config schemas."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli import main
from compression.configs import CONFIG_CLASSES, parse_config
from compression.method_docs import config_keys, example_config, method_catalog, update_readme

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_reference_is_up_to_date() -> None:
    text = README.read_text()
    assert update_readme(text) == text, "run .venv/bin/python scripts/render_config_reference.py"
    assert "#### `mixed_precision`" in text and "| `budgets` | `null` |" in text


@pytest.mark.parametrize("entry", method_catalog(), ids=lambda entry: entry["key"])
def test_every_key_has_its_default_and_the_example_is_valid(entry: dict) -> None:
    cls = CONFIG_CLASSES[entry["key"]]
    keys = {k["name"]: k for k in config_keys(entry["config_schema"])}
    assert set(keys) == set(cls.model_fields) - {"method"}
    defaults = cls().model_dump(mode="json")
    documented = {name: key["default"] for name, key in keys.items()}
    # a documented default is the default as a user would write it (a pipeline's steps with empty configs)
    assert cls.model_validate(documented).model_dump(mode="json") == defaults
    assert {n: v for n, v in documented.items() if n != "steps"} == {n: defaults[n] for n in keys if n != "steps"}
    example = example_config(entry["config_schema"])
    assert example and parse_config(entry["key"], example).model_dump(mode="json") == defaults


def test_methods_command_prints_data_keys_ranges_and_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "prune_structured"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prune_structured: ")
    assert "data: calibration data required (npz, text)" in out
    assert "round_to = 8  [integer >= 1, <= 128]" in out
    assert 'target = {"metric": "flops", "reduction": 0.5}' in out
    assert "example: --config '{" in out and "quant_rtn" not in out


def test_methods_command_lists_every_method_and_refuses_an_unknown_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{key}: " in f"\n{out}" for key in CONFIG_CLASSES)
    assert main(["methods", "quant_magic"]) == 3
    err = capsys.readouterr().err
    assert "unknown_method" in err and "valid: quant_rtn, quant_gptq" in err
