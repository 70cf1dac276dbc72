"""Data sources in training configs: every example config in configs/data_sources loads and
tokenises; SPO trains on PKU-SafeRLHF's two pair streams; the frozen log-prob cache notices a
changed source."""

from pathlib import Path

import pytest
import yaml

from helpers_tiny_lm import make_tokenizer, one_thread, save_tiny_model
from pyalign.data import DataSource, PreferenceDataset, load_pairs
from pyalign.train import ConfigError, StaleLogprobCacheError, config_to_dict, load_config
from pyalign.tasks.preference.rounds import run_sequential

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "configs" / "data_sources").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("data_training") / "pi0")


@pytest.fixture(autouse=True)
def in_repo(monkeypatch, tmp_path):
    import datasets.config

    monkeypatch.chdir(REPO)  # the example configs' paths are relative to the repository root
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def example(name, tiny_model, tmp_path) -> dict:
    data = yaml.safe_load((REPO / "configs" / "data_sources" / name).read_text())
    data["model"]["path"] = str(tiny_model)
    data["output_dir"] = str(tmp_path / "out")
    data["training"].update(device="cpu", progress_bar=False, max_length=48, max_prompt_length=32)
    return data


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_load_and_tokenise(path, tiny_model, tmp_path):
    config = load_config(example(path.name, tiny_model, tmp_path))
    tokenizer = make_tokenizer()
    for r in config.rounds:
        for source in (r.train, r.eval):
            if source is None:
                continue
            assert isinstance(source, DataSource)
            data = PreferenceDataset.from_source(source, tokenizer, 48, 32)
            assert len(data) > 0 and len(data) == len(load_pairs(source))
    # the resolved config (as written to output_dir/config.json) loads back to the same sources
    again = load_config(config_to_dict(config))
    assert [(r.train, r.eval) for r in again.rounds] == [(r.train, r.eval) for r in config.rounds]


def test_round_source_errors_name_the_field(tiny_model, tmp_path):
    data = example("pku_saferlhf_spo.yaml", tiny_model, tmp_path)
    data["rounds"][1]["train"] = {"path": "configs/data/samples/pku_saferlhf", "dimension": "kindness"}
    with pytest.raises(ConfigError, match=r"rounds\[1\].train.dimension: expected one of pku_saferlhf: helpful/harmless, helpsteer2: "):
        load_config(data)
    data["rounds"][1]["train"] = "configs/data/samples/missing.jsonl"
    with pytest.raises(ConfigError, match=r"rounds\[1\].train: file not found"):
        load_config(data)


def test_spo_on_pku_saferlhf_streams_and_the_cache_sees_a_changed_source(tiny_model, tmp_path):
    data = example("pku_saferlhf_spo.yaml", tiny_model, tmp_path)
    result = run_sequential(data)
    assert [d.name for d in result.round_dirs] == ["round_1_helpful", "round_2_harmless"]
    assert {"loss", "reward_accuracy"} <= set(result.metrics[1]["eval"])  # round 2 evaluated on its test split
    # rerunning the same config finds everything done
    run_sequential(data)
    from pyalign.tasks.preference.evaluate import evaluate_run

    table = evaluate_run(data)  # `pyalign eval CONFIG`: every model on every round's eval source
    assert table["dimensions"] == ["helpful", "harmless"] and len(table["models"]) == 2
    assert table["metrics"][table["models"][1]]["harmless"]["pairs"] == 2

    # round 2's eval source now yields other pairs: pi_0's cached log-probs on it are stale
    data["rounds"][1]["eval"] = dict(data["rounds"][1]["eval"], limit=1)
    with pytest.raises(StaleLogprobCacheError, match="data_fingerprint"):
        run_sequential(data)
    run_sequential(data, recompute_stale_cache=True)
