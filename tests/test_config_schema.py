"""`pyalign config --schema`: the JSON Schema of a config file is a real schema that the shipped
configs satisfy and that refuses what pyalign refuses (an editor completing and checking YAML with
it sees the same fields, types, bounds and defaults as `pyalign train`)."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from pyalign.cli import main
from pyalign.train import config_schema, task_names

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted([*REPO.glob("configs/*_example.yaml"), *REPO.glob("configs/data_sources/*.yaml")])


def schema_from_cli(capsys, *args) -> dict:
    assert main(["config", "--schema", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("task", [None, *task_names()])
def test_the_printed_schema_is_a_valid_json_schema(capsys, task):
    schema = schema_from_cli(capsys, *(["--task", task] if task else []))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema == config_schema(task)


def test_every_shipped_training_config_satisfies_the_schema():
    assert len(TRAIN_CONFIGS) >= 8
    validator = jsonschema.Draft202012Validator(config_schema())
    for file in TRAIN_CONFIGS:
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(
            yaml.safe_load(file.read_text()))]
        assert not errors, f"{file.name}: {errors}"


@pytest.mark.parametrize("change, where", [
    ({"training": {"lr": -1}}, "training"),  # exclusiveMinimum 0
    ({"training": {"learning_rate": 1e-5}}, "training"),  # unknown field
    ({"training": {"epochs": 1.5}}, "training"),  # integer
    ({"lora": {"target_modules": []}}, "lora"),  # a non-empty list, or all-linear
    ({"method": {"loss": "ppo"}}, "method"),  # one of the losses
    ({"rounds": []}, None),  # at least one round
    ({"epochs": 3}, None),  # unknown top-level field
])
def test_the_schema_refuses_what_pyalign_refuses(change, where):
    config = yaml.safe_load((REPO / "configs" / "dpo_example.yaml").read_text())
    for key, value in change.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    validator = jsonschema.Draft202012Validator(config_schema("preference"))
    errors = list(validator.iter_errors(config))
    assert errors, change
    if where is not None:
        assert any(e.absolute_path and e.absolute_path[0] == where for e in errors), [e.message for e in errors]


def test_the_task_field_selects_the_task_and_defaults_to_preference():
    schema = config_schema()
    validator = jsonschema.Draft202012Validator(schema)
    sft = yaml.safe_load((REPO / "configs" / "sft_example.yaml").read_text())
    assert not list(validator.iter_errors(sft))
    assert list(validator.iter_errors({**sft, "task": "dpa"}))  # an sft config is not a dpa one
    preference = yaml.safe_load((REPO / "configs" / "dpo_example.yaml").read_text())
    assert "task" not in preference and not list(validator.iter_errors(preference))


def test_the_schema_carries_defaults_and_documentation():
    training = config_schema("sft")["$defs"]["TrainingConfig"]["properties"]
    assert training["lr"]["default"] == 1e-5 and training["lr"]["exclusiveMinimum"] == 0
    assert training["lr"]["description"] == "peak learning rate"
    assert training["warmup_ratio"]["minimum"] == 0 and training["warmup_ratio"]["exclusiveMaximum"] == 1
    assert config_schema("sft")["$defs"]["LoraConfig"]["properties"]["target_modules"]["default"] == ["q_proj", "v_proj"]


def test_schema_and_a_config_file_do_not_mix(capsys, tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("task: sft\n")
    assert main(["config", "--schema", str(file)]) == 2
    assert "--schema: prints the schema of a task's config" in capsys.readouterr().err
