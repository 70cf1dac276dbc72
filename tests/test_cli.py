"""Config validation (every error names its field) and the `pyalign` command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers_tiny_lm import make_pairs, one_thread, save_tiny_model, write_jsonl
from pyalign.cli import main
from pyalign.data import load_preference_pairs
from pyalign.train import ConfigError, load_config

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_assets")
    model = save_tiny_model(root / "pi0")
    train = write_jsonl(root / "train.jsonl", make_pairs(8, seed=1))
    held_out = write_jsonl(root / "eval.jsonl", make_pairs(4, seed=2))
    return root, model, train, held_out


def base_config(assets, output_dir="out"):
    root, model, train, held_out = assets
    return {
        "model": {"path": str(model)},
        "rounds": [{"name": "helpful", "train": str(train), "eval": str(held_out)},
                   {"name": "concise", "train": str(train)}],
        "method": {"loss": "spo", "alpha": 0.1},
        "training": {"epochs": 1, "batch_size": 4, "max_length": 32, "max_prompt_length": 16,
                     "progress_bar": False, "tensorboard": False},
        "output_dir": str(root / output_dir),
    }


def with_change(config, path, value):
    """Copy of ``config`` with the dotted ``path`` set (``value=...`` deletes it)."""
    config = json.loads(json.dumps(config))
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if value is ...:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return config


BAD_CONFIGS = [
    ("training.lr", -1, r"^training\.lr: expected a positive float, got -1$"),
    ("training.lr", "fast", r"^training\.lr: expected a positive float, got 'fast'"),
    ("training.epochs", 1.5, r"^training\.epochs: expected a positive integer, got 1\.5"),
    ("training.batch_size", 0, r"^training\.batch_size: expected a positive integer"),
    ("training.warmup_ratio", 1.0, r"^training\.warmup_ratio: expected a float in \[0, 1\)"),
    ("training.device", "tpu", r"^training\.device: expected auto, cpu, cuda or cuda:N"),
    ("training.gradient_checkpointing", "yes", r"^training\.gradient_checkpointing: expected true or false"),
    ("training.max_prompt_length", 32, r"^training\.max_prompt_length: must be below training\.max_length=32"),
    ("training.learning_rate", 1e-5, r"^training\.learning_rate: unknown field \(known: lr, "),
    ("method.loss", "ppo", r"^method\.loss: expected one of dpo, ipo, hinge, robust, apo_zero, apo_down, kto_pair, spo"),
    ("method.beta", 0, r"^method\.beta: expected a positive float, got 0"),
    ("method.alpha", 1.5, r"^method\.alpha: expected a float in \[0, 1\], got 1\.5"),
    ("method.alpha", [0.1, 0.2], r"^method\.alpha: expected 1 values \(one per round but the last\), got 2"),
    ("method.label_smoothing", 0.1, r"^method\.label_smoothing: only dpo and robust use it"),
    ("method", {"loss": "dpo", "label_smoothing": 0.6}, r"^method\.label_smoothing: dpo needs a value in \[0, 0\.5\]"),
    ("method", {"loss": "robust", "label_smoothing": 0.5}, r"^method\.label_smoothing: robust needs a value in \[0, 0\.5\)"),
    ("lora.r", 0, r"^lora\.r: expected a positive integer, got 0"),
    ("lora.trainable_token_indices", [3, -1], r"^lora\.trainable_token_indices\[1\]: expected a non-negative integer"),
    ("lora.target_modules", "q_proj", r"^lora\.target_modules: expected a non-empty list"),
    ("model.dtype", "float16", r"^model\.dtype: expected one of float32, bfloat16"),
    ("model.path", "/no/such/model", r"^model\.path: no such model folder"),
    ("model", ..., r"^model: required field is missing"),
    ("rounds.0.name", "a/b", r"^rounds\[0\]\.name: expected a name of letters"),
    ("rounds.1.name", "helpful", r"^rounds\[1\]\.name: 'helpful' is used twice"),
    ("rounds.1.train", "/no/such.jsonl", r"^rounds\[1\]\.train: file not found"),
    ("rounds.0.weight", 2, r"^rounds\[0\]\.weight: unknown field"),
    ("rounds", [], r"^rounds: expected a non-empty list"),
    ("epochs", 3, r"^epochs: unknown field"),
]


@pytest.mark.parametrize("path,value,message", BAD_CONFIGS, ids=[f"{p}={v!r}" for p, v, _ in BAD_CONFIGS])
def test_bad_config_names_the_field(assets, path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(with_change(base_config(assets), path, value))


def test_config_from_yaml_with_defaults_and_exponent_strings(assets, tmp_path):
    config = base_config(assets)
    config["training"]["lr"] = "1e-5"  # what PyYAML makes of `lr: 1e-5`
    config["method"]["alpha"] = [0.2]
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(config))
    loaded = load_config(file)
    assert loaded.training.lr == 1e-5
    assert loaded.lora.r == 8 and loaded.lora.alpha == 32 and loaded.method.beta == 0.1
    assert loaded.method.alphas_for_round(2) == [0.2]
    assert loaded.logprob_cache_dir == Path(loaded.output_dir) / "logprob_cache"
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_cli_config_reports_bad_field_with_exit_status_2(assets, tmp_path, capsys):
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(with_change(base_config(assets), "training.lr", -1)))
    assert main(["config", str(file)]) == 2
    assert "training.lr: expected a positive float, got -1" in capsys.readouterr().err
    assert main(["config"]) == 0
    assert "training.max_prompt_length" in capsys.readouterr().out


def test_cli_train_then_eval(assets, tmp_path, capsys):
    root, model, train, held_out = assets
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(base_config(assets, output_dir=tmp_path / "run")))
    assert main(["train", str(file), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    final = tmp_path / "run" / "round_2_concise" / "model"
    assert f"final model: {final}" in out

    table_file = tmp_path / "table.json"
    assert main(["eval", str(file), "--json", str(table_file)]) == 0
    assert "pi_2 (concise)" in capsys.readouterr().out
    table = json.loads(table_file.read_text())
    assert table["dimensions"] == ["helpful", "concise"]
    assert table["models"] == ["pi_1 (helpful)", "pi_2 (concise)"]
    assert 0 <= table["metrics"]["pi_1 (helpful)"]["helpful"]["reward_accuracy"] <= 1

    assert main(["eval", str(final), "--data", str(held_out), "--ref", str(model),
                 "--max-length", "32", "--max-prompt-length", "16"]) == 0
    assert "reward_accuracy=" in capsys.readouterr().out
    assert main(["eval", str(final)]) == 2
    assert "--data" in capsys.readouterr().err


def test_python_dash_m_pyalign(assets):
    done = subprocess.run([sys.executable, "-m", "pyalign", "config"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "method.alpha" in done.stdout


def test_cli_asks_torch_for_huge_pages_unless_the_user_chose(assets, monkeypatch, capsys):
    import os

    from pyalign.cli import main

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert main(["config"]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert main(["config"]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["dpo_example.yaml", "spo_real_data_example.yaml", "sft_example.yaml"])
def test_example_configs_are_valid(assets, name, tmp_path, monkeypatch):
    """The shipped examples use only real fields and valid values; the model folder and the
    user-prepared data files are swapped for test fixtures."""
    root, model, train, held_out = assets
    monkeypatch.chdir(REPO)  # the examples' relative paths are from the repository root
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    raw["model"]["path"] = str(model)
    if name == "sft_example.yaml":  # its data ships with the repository
        from pyalign.tasks.sft.data import load_sft_examples

        config = load_config(raw)
        assert config.output_dir.startswith(str(REPO / "outputs"))
        assert len(load_sft_examples(config.data.train)) == 12 and len(load_sft_examples(config.data.eval)) == 4
        return
    for entry in raw["rounds"]:
        for split in ("train", "eval"):
            if split in entry and not Path(entry[split]).is_file():
                entry[split] = str(held_out if split == "eval" else train)
    config = load_config(raw)
    assert config.output_dir.startswith(str(REPO / "outputs"))
    if name == "dpo_example.yaml":  # its data ships with the repository
        assert config.rounds[0].train == str(REPO / "configs" / "data" / "helpful_train.jsonl")
        assert len(load_preference_pairs(config.rounds[0].train)) == 12
        assert len(load_preference_pairs(config.rounds[0].eval)) == 4


# ----------------------------------------------------------------------------- tasks

def sft_config(assets, output_dir="sft_out"):
    root, model, train, held_out = assets
    sft_train = write_jsonl(root / "sft_train.jsonl", [{"prompt": p["prompt"], "response": p["chosen"]}
                                                       for p in make_pairs(6, seed=5)])
    return {
        "task": "sft",
        "model": {"path": str(model)},
        "data": {"train": str(sft_train)},
        "training": {"epochs": 1, "batch_size": 3, "max_length": 32, "max_prompt_length": 16,
                     "progress_bar": False, "tensorboard": False, "save_every": 0},
        "output_dir": str(root / output_dir),
    }


BAD_TASK_CONFIGS = [
    ("task", "ppo", r"^task: expected one of preference, sft"),
    ("task", 3, r"^task: expected one of preference, sft"),
    ("data", ..., r"^data: required field is missing"),
    ("data.train", "/no/such.jsonl", r"^data\.train: file not found"),
    ("data.pairs", "x.jsonl", r"^data\.pairs: unknown field \(known: train, eval\)"),
    ("rounds", [], r"^rounds: unknown field"),
    ("training.max_prompt_length", 40, r"^training\.max_prompt_length: must be below training\.max_length=32"),
    ("model.path", "/no/such/model", r"^model\.path: no such model folder"),
]


@pytest.mark.parametrize("path,value,message", BAD_TASK_CONFIGS, ids=[f"{p}={v!r}" for p, v, _ in BAD_TASK_CONFIGS])
def test_bad_sft_config_names_the_field(assets, path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(with_change(sft_config(assets), path, value))


def test_config_without_task_is_preference_and_resolved_config_names_its_task(assets, tmp_path, capsys):
    from pyalign.tasks.preference import SequentialConfig
    from pyalign.train import config_to_dict

    config = load_config(base_config(assets))
    assert isinstance(config, SequentialConfig) and config_to_dict(config)["task"] == "preference"
    assert load_config(config_to_dict(config)) == config  # a printed config loads again
    with pytest.raises(ConfigError, match=r"^task: this runs 'sft', the config says 'preference'"):
        load_config({**base_config(assets), "task": "preference"}, task="sft")
    assert main(["config", "--task", "sft"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("task: sft") and "data.train" in out and "training.batch_size" in out
    assert "method.alpha" not in out
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "task: preference (the default)" in out and "task: sft" in out and "data.eval" in out


def test_a_task_missing_from_this_install_is_refused_by_name(monkeypatch):
    from pyalign.train import registry as tasks

    monkeypatch.setitem(tasks.TASK_MODULES, "ghost", "pyalign.no_such_module")
    with pytest.raises(ConfigError, match=r"task: 'ghost' is provided by pyalign\.no_such_module, which is not installed"):
        load_config({"task": "ghost"})
    assert "ghost" not in tasks.task_names()


def test_a_module_registers_a_task_that_pyalign_train_runs(assets, tmp_path, capsys, monkeypatch):
    """The registry is the only place a task needs: config checks, `pyalign config` and
    `pyalign train` pick it up."""
    from pyalign.train import PathValue, PositiveInt, Section, TrainingConfig, field, section
    from pyalign.train import registry as tasks

    class CountConfig(Section):
        output_dir: PathValue = field(doc="where the count goes")
        upto: PositiveInt = field(3, "how far to count")
        training: TrainingConfig = section(TrainingConfig, "optimisation")

    def run(config, *, callback=None):
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.output_dir) / "count.txt").write_text(" ".join(map(str, range(1, config.upto + 1))))
        return config.output_dir

    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    tasks.register_task(tasks.Task("count", CountConfig, run, summary=lambda out: [f"counted into {out}"],
                                   doc="counts"))
    with pytest.raises(ConfigError, match=r"^upto: expected a positive integer, got 0"):
        load_config({"task": "count", "output_dir": str(tmp_path), "upto": 0})
    file = tmp_path / "count.yaml"
    file.write_text(yaml.safe_dump({"task": "count", "output_dir": str(tmp_path / "c"), "upto": 4}))
    assert main(["train", str(file), "--device", "cpu"]) == 0
    assert (tmp_path / "c" / "count.txt").read_text() == "1 2 3 4"
    assert f"counted into {tmp_path / 'c'}" in capsys.readouterr().out
    assert main(["train", str(file), "--recompute-stale-cache"]) == 2
    assert "--recompute-stale-cache: task count has no frozen log-prob cache" in capsys.readouterr().err
    assert main(["config", "--task", "count"]) == 0
    assert "upto" in capsys.readouterr().out


def test_cli_trains_sft(assets, tmp_path, capsys):
    file = tmp_path / "sft.yaml"
    file.write_text(yaml.safe_dump(sft_config(assets, output_dir=tmp_path / "unused")))
    assert main(["train", str(file), "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / "sft"),
                 "--num-threads", "1"]) == 0
    assert f"model: {tmp_path / 'sft' / 'model'}" in capsys.readouterr().out
    assert (tmp_path / "sft" / "model" / "model.safetensors").is_file() and not (tmp_path / "unused").exists()
    saved = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert saved["training"]["num_threads"] == 1 and saved["output_dir"] == str(tmp_path / "sft")
    assert json.loads((tmp_path / "sft" / "metrics.json").read_text())["history"][-1]["step_s"] > 0
    assert main(["train", str(file), "--num-threads", "0"]) == 2
    assert "--num-threads: expected a positive integer, got 0" in capsys.readouterr().err
