"""Training and evaluation the APO/CLAIR and reward-augmented demos share (docs/experiments.md).

- :func:`source_model`: SmolLM2-135M-Instruct (converted once, cached) or, for ``--quick``, a
  tiny random chat model whose vocabulary holds the questions and answers;
- :func:`sample`: M's samples of a prompt list, cached as JSONL (:func:`pyalign.generation.generate_jsonl`);
- :func:`train`: one fine-tune from M on a pairs file, by the preference task
  (:func:`pyalign.tasks.preference.rounds.run_sequential`, one round, any pairwise loss) or by the
  SFT task on the chosen answers (:func:`pyalign.tasks.sft.run.run_sft`); the same LoRA and
  training settings for every run; reruns reuse finished runs;
- :func:`greedy_eval`: greedy answers to the held-out questions: accuracy with its Wilson
  interval, mean graded score with its t-interval, mean answer length in tokens;
- :func:`pair_logprobs`: sequence log-probs of a pairs file's chosen and rejected answers under a
  model (the trainer's own function), for the change a run made to them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pyalign.demo.checkable import grade, reference_answer, t_interval, wilson_interval
from pyalign.demo.dpa_tasks import Task, is_correct
from pyalign.io import read_jsonl_rows, write_json_atomic, write_jsonl_atomic
# imported here, not on first use, so a long run keeps the code it started with
from pyalign.tasks.preference.rounds import run_sequential
from pyalign.tasks.sft.run import run_sft

log = logging.getLogger("pyalign.demo")


def source_model(settings: dict, out: Path, tasks: list[Task], extra_texts: list[str] = ()) -> Path:
    """M: SmolLM2 (``model: smollm2``) or a tiny random chat model saved in ``out/tiny_model``."""
    if settings["model"] == "smollm2":
        from pyalign.models import smollm2_path  # noqa: PLC0415

        return smollm2_path()
    from pyalign.demo.tiny_model import save_tiny_chat_model  # noqa: PLC0415

    folder = out / "tiny_model"
    if not (folder / "config.json").is_file():
        texts = [t.prompt for t in tasks] + [reference_answer(t) for t in tasks] + list(extra_texts)
        save_tiny_chat_model(folder, extra_texts=texts + [" ".join(str(i) for i in range(100))])
    return folder


def load(model_dir: Path):
    from pyalign.models import load_model_and_tokenizer  # noqa: PLC0415

    model, tokenizer = load_model_and_tokenizer(model_dir)
    model.eval()
    return model, tokenizer


def sample(path: Path, model, tokenizer, tasks: list[Task], *, system, n: int, temperature: float,
           settings: dict, label: str, seed: int | None = None) -> list[list[str]]:
    """``n`` answers per question (greedy at ``temperature == 0``), cached in ``path``."""
    from pyalign.generation import generate_jsonl  # noqa: PLC0415

    greedy = temperature == 0
    rows = generate_jsonl(
        path, model, tokenizer, [t.prompt for t in tasks], system=system, n=n,
        max_new_tokens=settings["max_new_tokens"], do_sample=not greedy, temperature=1.0 if greedy else temperature,
        top_p=1.0 if greedy else settings["sampling"]["top_p"],
        seed=settings["sampling"]["seed"] if seed is None else seed, batch_size=settings["sampling"]["batch_size"],
        progress=label, backend="hf",
    )
    return [[s.text for s in row] for row in rows]


def summarize_answers(tasks: list[Task], answers: list[str], lengths: list[int]) -> dict:
    """Accuracy (Wilson 95%), mean score (t 95%), mean length of one answer per question."""
    correct = sum(is_correct(t, a) for t, a in zip(tasks, answers))
    scores = [float(grade(t, a)) for t, a in zip(tasks, answers)]
    return {"accuracy": round(correct / len(tasks), 4), "accuracy_ci": wilson_interval(correct, len(tasks)),
            "score": round(sum(scores) / len(scores), 4), "score_ci": t_interval(scores),
            "mean_length": round(sum(lengths) / len(lengths), 2), "questions": len(tasks)}


def greedy_eval(model_dir: Path, tasks: list[Task], settings: dict, out_file: Path, *, system,
                label: str) -> dict:
    """Greedy answers of the model in ``model_dir`` to ``tasks``: :func:`summarize_answers`,
    written with every answer to ``out_file`` (reused when it is there)."""
    if out_file.is_file():
        rows = read_jsonl_rows(out_file)
        if len(rows) == len(tasks) and all(r["prompt"] == t.prompt for r, t in zip(rows, tasks)):
            return summarize_answers(tasks, [r["answer"] for r in rows], [r["tokens"] for r in rows])
    from pyalign.generation import generate  # noqa: PLC0415

    model, tokenizer = load(model_dir)
    rows = generate(model, tokenizer, [t.prompt for t in tasks], system=system, n=1,
                    max_new_tokens=settings["max_new_tokens"], do_sample=False, batch_size=settings["eval_batch_size"],
                    progress=f"evaluating {label}", backend="hf")
    del model
    answers = [r[0].text for r in rows]
    lengths = [len(r[0].token_ids) for r in rows]
    write_jsonl_atomic(out_file, [
        {"prompt": t.prompt, "answer": a, "tokens": n, "correct": is_correct(t, a), "score": grade(t, a)}
        for t, a, n in zip(tasks, answers, lengths)])
    result = summarize_answers(tasks, answers, lengths)
    log.info("%s: accuracy %.3f %s, score %.2f, mean length %.1f", label, result["accuracy"], result["accuracy_ci"],
             result["score"], result["mean_length"])
    return result


def train(objective: str, pairs_file: Path, base: Path, run_dir: Path, settings: dict, *, cache_dir: Path,
          relabel: dict | None = None) -> Path:
    """Fine-tune M on ``pairs_file`` with ``objective`` (a pairwise loss of pyalign, or ``sft`` on
    the chosen answers); ``relabel``: the data source's relabeling (e.g. reward-augmented, pairwise
    losses only). Returns the merged model's folder."""
    training = {**settings["training"], "eval_every": 0}
    if objective == "sft":
        examples = [{"prompt": r["prompt"], "response": r["chosen"], **({"system": r["system"]} if r.get("system") else {})}
                    for r in read_jsonl_rows(pairs_file)]
        sft_file = write_jsonl_atomic(run_dir.parent / f"{run_dir.name}.sft.jsonl", examples)
        config = {"model": {"path": str(base), "dtype": "float32"}, "data": {"train": str(sft_file)},
                  "lora": settings["lora"], "training": training, "output_dir": str(run_dir)}
        write_json_atomic(run_dir.parent / f"{run_dir.name}.config.json", config)
        return Path(run_sft(config).model_dir)
    config = {"model": {"path": str(base), "dtype": "float32"}, "lora": settings["lora"],
              "method": {"loss": objective, "beta": settings["beta"]},
              "rounds": [{"name": "pairs", "train": {"path": str(pairs_file), **({"relabel": relabel} if relabel else {})}}],
              "training": training,
              "output_dir": str(run_dir), "cache_dir": str(cache_dir)}
    write_json_atomic(run_dir.parent / f"{run_dir.name}.config.json", config)
    return Path(run_sequential(config).final_model_dir)


def pair_logprobs(model_dir: Path, pairs_file: Path, settings: dict, cache_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (chosen ``[N]``, rejected ``[N]``) of the pairs under the model, cached."""
    if cache_file.is_file():
        saved = torch.load(cache_file, weights_only=True)
        return saved["chosen"], saved["rejected"]
    from pyalign.data import PreferenceDataset  # noqa: PLC0415
    from pyalign.train import dataset_logprobs  # noqa: PLC0415

    model, tokenizer = load(model_dir)
    training = settings["training"]
    data = PreferenceDataset.from_source(str(pairs_file), tokenizer, training["max_length"], training["max_prompt_length"])
    chosen, rejected = dataset_logprobs(model, data, batch_size=settings["eval_batch_size"] // 2,
                                        device=torch.device("cpu"), mixed_precision="no", average=False,
                                        fused=settings["training"].get("fused_lm_head", "auto"))
    del model
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"chosen": chosen, "rejected": rejected}, cache_file)
    return chosen, rejected


def mean_change(after: torch.Tensor, before: torch.Tensor, mask: list[bool] | None = None) -> float | None:
    """Mean of ``after - before`` (over ``mask``'s rows); None when no row is selected."""
    difference = (after.double() - before.double())
    if mask is not None:
        difference = difference[torch.tensor(mask, dtype=torch.bool)]
    return round(float(difference.mean()), 3) if difference.numel() else None
