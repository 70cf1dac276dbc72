"""The four preference data sets of the APO/CLAIR demo, built from the same training questions
(docs/experiments.md, "APO and CLAIR"):

- ``clair``: y_l sampled from M, y_w = its minimal revision by pyalign's CLAIR pipeline
  (:func:`pyalign.data.clair.make_clair_pairs`) with a reviser that knows the answer
  (:func:`pyalign.demo.checkable.revise_answer` as a :class:`pyalign.data.clair.ProgramReviser`);
  a y_l that is already correct is left unchanged and dropped by the pipeline;
- ``judge_on_policy``: two samples of M, the checker prefers the correct one; a tie (both right
  or both wrong) is dropped and, for ``judge_draws`` > 1, the question gets another draw of two;
- ``judge_off_policy``: the same with the samples of a model worse than M (M at a high
  temperature), so y_w is correct but usually worse written than M's own answer;
- ``stronger_preferred``: y_w = an independently written correct answer
  (:func:`pyalign.demo.checkable.reference_answer`), y_l = CLAIR's y_l (the same prompts and
  rejected answers as ``clair``, so the two differ only in how y_w was made).

Each is cut to the first ``pairs_per_dataset`` pairs in question order. Per data set:
pairs, mean token edit distance between chosen and rejected, how often y_w is correct and how
often y_w grades higher than M's own greedy answer (:func:`pyalign.demo.checkable.grade`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pyalign.demo.apo_clair_train import sample
from pyalign.demo.checkable import SYSTEM, grade, reference_answer, revise_answer, token_edit_distance, wilson_interval
from pyalign.demo.dpa_tasks import Task, is_correct
from pyalign.io import read_jsonl_rows, write_json_atomic, write_jsonl_atomic

log = logging.getLogger("pyalign.demo")
DATASETS = ("clair", "judge_on_policy", "judge_off_policy", "stronger_preferred")
REVISER_NAME = "pyalign.demo.checkable.revise_answer v1"


def pair_record(task: Task, index: int, chosen: str, rejected: str) -> dict:
    return {"prompt": task.prompt, "chosen": chosen, "rejected": rejected, "system": SYSTEM,
            "meta": {"index": index, "kind": task.kind}}


def clair_pairs(model, tokenizer, name: str, tasks: list[Task], settings: dict, out: Path) -> tuple[list[dict], dict]:
    """CLAIR pairs of every training question (before the cut) and the pipeline's summary."""
    from pyalign.data.clair import ClairSettings, ProgramReviser, make_clair_pairs  # noqa: PLC0415

    by_prompt = {t.prompt: t for t in tasks}
    reviser = ProgramReviser(lambda prompt, response: revise_answer(by_prompt[prompt], response), name=REVISER_NAME)
    sampling = settings["sampling"]
    clair = ClairSettings(output_format="plain", max_new_tokens=settings["max_new_tokens"],
                          temperature=sampling["temperature"], top_p=sampling["top_p"], seed=sampling["seed"],
                          batch_size=sampling["batch_size"], **settings["clair_filters"])
    summary = make_clair_pairs([(t.prompt, SYSTEM) for t in tasks], (model, tokenizer, name), reviser,
                               out / "clair_all.jsonl", settings=clair, progress=False)
    rows = read_jsonl_rows(out / "clair_all.jsonl")
    return [pair_record(tasks[r["meta"]["index"]], r["meta"]["index"], r["chosen"], r["rejected"]) for r in rows], summary


def judge_pairs(tasks: list[Task], draws: list[list[list[str]]]) -> list[dict]:
    """Per question, the first draw of two samples in which the checker finds one correct and one
    wrong answer gives the pair (the correct one preferred); a tie (both right or both wrong) is
    dropped and the next draw is looked at. ``draws[d][i]``: the samples of draw d for question i."""
    pairs = []
    for i, task in enumerate(tasks):
        for draw in draws:
            right = [t for t in draw[i] if is_correct(task, t)]
            wrong = [t for t in draw[i] if not is_correct(task, t)]
            if right and wrong:
                pairs.append(pair_record(task, i, right[0], wrong[0]))
                break
    return pairs


def draws_of_two(folder: Path, name: str, model, tokenizer, tasks: list[Task], *, temperature: float, count: int,
                 first_seed: int, settings: dict, label: str) -> list[list[list[str]]]:
    """``count`` independent draws of two samples per question (seeds ``first_seed``,
    ``first_seed + 2``, ...), each cached in its own file."""
    return [sample(folder / (f"{name}.samples.jsonl" if d == 0 else f"{name}.draw{d + 1}.samples.jsonl"), model,
                   tokenizer, tasks, system=SYSTEM, n=2, temperature=temperature, settings=settings,
                   label=f"{label}, draw {d + 1}", seed=first_seed + 2 * d) for d in range(count)]


def stronger_pairs(tasks: list[Task], clair: list[dict]) -> list[dict]:
    """The CLAIR pairs' prompts and y_l, with an independently written correct y_w."""
    return [pair_record(tasks[r["meta"]["index"]], r["meta"]["index"], reference_answer(tasks[r["meta"]["index"]]),
                        r["rejected"]) for r in clair]


def dataset_stats(name: str, pairs: list[dict], available: int, tasks: list[Task], greedy: list[str],
                  tokenizer) -> dict:
    """The issue's per-data-set row, plus the rejected answers' correctness and lengths."""
    count = len(pairs)

    def mean(values):
        return round(sum(values) / len(values), 4) if values else None

    task_of = [tasks[p["meta"]["index"]] for p in pairs]
    chosen_right = [is_correct(t, p["chosen"]) for t, p in zip(task_of, pairs)]
    better = [grade(t, p["chosen"]) > grade(t, greedy[p["meta"]["index"]]) for t, p in zip(task_of, pairs)]
    return {
        "name": name, "pairs": count, "pairs_available": available,
        "edit_distance": mean([token_edit_distance(tokenizer, p["chosen"], p["rejected"]) for p in pairs]),
        "chosen_correct": mean(chosen_right), "chosen_correct_ci": wilson_interval(sum(chosen_right), count),
        "rejected_correct": mean([is_correct(t, p["rejected"]) for t, p in zip(task_of, pairs)]),
        "chosen_better_than_model": mean(better), "chosen_better_than_model_ci": wilson_interval(sum(better), count),
        "chosen_tokens": mean([len(tokenizer(p["chosen"], add_special_tokens=False)["input_ids"]) for p in pairs]),
        "rejected_tokens": mean([len(tokenizer(p["rejected"], add_special_tokens=False)["input_ids"]) for p in pairs]),
    }


def build_datasets(model, tokenizer, name: str, tasks: list[Task], settings: dict, out: Path) -> tuple[dict, list[dict], dict]:
    """Write ``out/<dataset>.jsonl`` for the four data sets; returns their files, their stats
    and facts about the samplers (M's greedy and off-policy accuracies, CLAIR's summary)."""
    out.mkdir(parents=True, exist_ok=True)
    sampling = settings["sampling"]
    greedy = [r[0] for r in sample(out / "greedy.samples.jsonl", model, tokenizer, tasks, system=SYSTEM, n=1,
                                   temperature=0, settings=settings, label="M greedy (train questions)")]
    clair, clair_summary = clair_pairs(model, tokenizer, name, tasks, settings, out)
    on_policy = draws_of_two(out, "on_policy", model, tokenizer, tasks, temperature=sampling["temperature"],
                             count=settings["judge_draws"], first_seed=sampling["seed"] + 1, settings=settings,
                             label="M samples (on-policy judge)")
    off = settings["off_policy"]
    off_policy = draws_of_two(out, f"off_policy_t{off['temperature']:g}", model, tokenizer, tasks,
                              temperature=off["temperature"], count=settings["judge_draws"],
                              first_seed=sampling["seed"] + 2, settings=settings,
                              label="worse model samples (off-policy judge)")
    every = {"clair": clair, "judge_on_policy": judge_pairs(tasks, on_policy),
             "judge_off_policy": judge_pairs(tasks, off_policy), "stronger_preferred": stronger_pairs(tasks, clair)}
    cut = settings["pairs_per_dataset"]
    files, stats = {}, []
    for dataset in DATASETS:
        pairs = every[dataset][:cut]
        if not pairs:  # e.g. a sampler that is never right (the tiny model): reported, not trained
            log.warning("%s: no pairs from %d training questions; no runs on it", dataset, len(tasks))
            stats.append({"name": dataset, "pairs": 0, "pairs_available": 0})
            continue
        files[dataset] = write_jsonl_atomic(out / f"{dataset}.jsonl", pairs)
        stats.append(dataset_stats(dataset, pairs, len(every[dataset]), tasks, greedy, tokenizer))

    def accuracy(rows):
        right = sum(is_correct(t, s) for t, row in zip(tasks, rows) for s in row)
        total = sum(len(row) for row in rows)
        return {"accuracy": round(right / total, 4), "accuracy_ci": wilson_interval(right, total), "answers": total}

    def merged(draws):
        return [[text for draw in draws for text in draw[i]] for i in range(len(tasks))]

    facts = {"greedy_train": accuracy([[g] for g in greedy]), "on_policy_sampler": accuracy(merged(on_policy)),
             "off_policy_sampler": {**accuracy(merged(off_policy)), "temperature": off["temperature"]},
             "clair": {k: clair_summary[k] for k in ("prompts", "kept", "rejected")}}
    write_json_atomic(out / "datasets.json", {"datasets": stats, "samplers": facts})
    return files, stats, facts
