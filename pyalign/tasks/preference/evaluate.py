"""Offline evaluation of trained models on preference pairs (``pyalign eval``).

Two questions:

- one model on one data file: mean chosen/rejected sequence log-probs and how often the chosen
  response is the likelier one; with a reference model, the DPO implicit reward
  ``beta * log(pi/pi_ref)``: reward accuracy, margin, chosen and rejected rewards;
- a sequential run: every finished round's model pi_k against pi_0 on every dimension's eval data
  (train data where a round has no eval file), i.e. how much of each preference pi_k holds. A
  preserved dimension keeps its accuracy high in the later rows; a forgotten one falls to ~50%.
"""

from __future__ import annotations

import json
from pathlib import Path

from pyalign.data import PreferenceDataset
from pyalign.models import load_model, load_tokenizer, resolve_device
from pyalign.tasks.preference.config import SequentialConfig, round_dir
from pyalign.train import dataset_logprobs, load_config


def preference_metrics(chosen, rejected, ref_chosen=None, ref_rejected=None, *, beta: float = 0.1) -> dict:
    """Metrics from sequence log-probs ``[N]`` (and optionally the reference's)."""
    metrics = {
        "pairs": int(chosen.numel()),
        "chosen_logp": chosen.mean().item(),
        "rejected_logp": rejected.mean().item(),
        "logp_accuracy": (chosen > rejected).float().mean().item(),
    }
    if ref_chosen is not None:
        chosen_rewards = beta * (chosen.double() - ref_chosen.double())
        rejected_rewards = beta * (rejected.double() - ref_rejected.double())
        margin = chosen_rewards - rejected_rewards
        metrics.update(
            reward_accuracy=(margin > 0).double().mean().item(),
            reward_margin=margin.mean().item(),
            chosen_reward=chosen_rewards.mean().item(),
            rejected_reward=rejected_rewards.mean().item(),
        )
    return metrics


def _logprobs_of(model_dir, datasets: dict, *, dtype: str, device, batch_size: int, mixed_precision: str) -> dict:
    model = load_model(model_dir, dtype, device)
    results = {
        name: dataset_logprobs(model, data, batch_size=batch_size, device=device,
                               mixed_precision=mixed_precision, average=False)
        for name, data in datasets.items()
    }
    del model
    return results


def evaluate_model(
    model_dir, data_files, *, ref_dir=None, beta: float = 0.1, max_length: int = 512,
    max_prompt_length: int = 256, batch_size: int = 8, device: str = "auto", dtype: str = "float32",
    mixed_precision: str = "auto",
) -> dict[str, dict]:
    """Metrics of ``model_dir`` (vs ``ref_dir`` if given) on each JSONL file, keyed by file."""
    tokenizer = load_tokenizer(model_dir)
    datasets = {str(f): PreferenceDataset.from_jsonl(f, tokenizer, max_length, max_prompt_length) for f in data_files}
    options = dict(dtype=dtype, device=resolve_device(device), batch_size=batch_size, mixed_precision=mixed_precision)
    policy = _logprobs_of(model_dir, datasets, **options)
    ref = _logprobs_of(ref_dir, datasets, **options) if ref_dir is not None else {}
    return {
        name: preference_metrics(*policy[name], *(ref.get(name) or (None, None)), beta=beta)
        for name in datasets
    }


def evaluate_run(config: SequentialConfig | str, *, split: str = "eval", batch_size: int | None = None) -> dict:
    """Every finished round's model against pi_0 on every round's data (``split``, falling back
    to train where a round has no eval file). Returns ``{"dimensions": [...], "models": [...],
    "metrics": {model: {dimension: metrics}}}``."""
    config = load_config(config, task="preference")
    training = config.training
    tokenizer = load_tokenizer(config.model.path)
    datasets = {}
    for r in config.rounds:
        file = (r.eval if split == "eval" else None) or r.train
        datasets[r.name] = PreferenceDataset.from_jsonl(file, tokenizer, training.max_length, training.max_prompt_length)
    options = dict(dtype=config.model.dtype, device=resolve_device(training.device),
                   batch_size=batch_size or training.eval_batch_size or training.batch_size,
                   mixed_precision=training.mixed_precision)
    base = _logprobs_of(config.model.path, datasets, **options)
    table = {"dimensions": list(datasets), "models": [], "metrics": {}}
    for n, r in enumerate(config.rounds, start=1):
        model_dir = round_dir(config, n) / "model"
        if not (round_dir(config, n) / "round_state.json").is_file():
            break
        label = f"pi_{n} ({r.name})"
        policy = _logprobs_of(model_dir, datasets, **options)
        table["models"].append(label)
        table["metrics"][label] = {
            name: preference_metrics(*policy[name], *base[name], beta=config.method.beta) for name in datasets
        }
    return table


def format_run_table(table: dict) -> str:
    """Reward accuracy (margin) of each model vs pi_0 on each dimension, as aligned text."""
    dims = table["dimensions"]
    width = max([len(m) for m in table["models"]] + [len("model")])
    lines = ["model".ljust(width) + "".join(f"  {d[:20]:>20s}" for d in dims)]
    for model in table["models"]:
        cells = []
        for d in dims:
            m = table["metrics"][model][d]
            cells.append(f"  {m['reward_accuracy'] * 100:6.1f}% ({m['reward_margin']:+.3f})".rjust(22))
        lines.append(model.ljust(width) + "".join(cells))
    lines.append("cells: reward accuracy of beta*log(pi_k/pi_0) on the dimension's pairs (mean margin)")
    return "\n".join(lines)


def write_json(path: str | Path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2), encoding="utf-8")


__all__ = ["preference_metrics", "evaluate_model", "evaluate_run", "format_run_table", "write_json"]
