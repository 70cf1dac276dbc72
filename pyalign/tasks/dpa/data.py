"""Data of the DPA loop: prompt files, the two alternating halves, the per-prompt directions, the
best sample per (prompt, direction), best-vs-worst pairs and replay (docs/dpa.md, "The loop").

Prompt files are JSONL, one object per line with a ``prompt``: the user's text, or a
conversation as chat messages ending with the user's turn (``[{"role": "user", "content": ...},
{"role": "assistant", ...}, {"role": "user", ...}]``, checked and kept as messages by the data
layer's rules, :func:`pyalign.data.pairs.prompt_field`). A conversation may not open with a
system message: the loop writes the direction v into the system prompt. Any other fields
(``response``, ``answer``, ...) ride along and are handed to the task's true-rating function. A
row whose ``prompt`` is missing or blank is not usable and is skipped (counted); a file with no
usable row is an error naming the file and the field.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

from pyalign.data.pairs import RowError, prompt_field
from pyalign.directions import (
    direction_system_prompt, sample_angle_directions, sample_sphere_directions, weighted_reward,
)

logger = logging.getLogger("pyalign.train")


def load_prompt_rows(path: str | Path, *, field: str = "prompts.train") -> list[dict]:
    """The usable rows of a prompt file (see the module docstring); ``field`` names the config
    field in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}: prompt file not found: {path}")
    rows, missing, blank = [], 0, 0
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{field}: {path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object with a 'prompt' field, got {type(record).__name__}")
            prompt = record.get("prompt")
            if prompt is None:
                missing += 1
                continue
            if isinstance(prompt, list):
                record = {**record, "prompt": conversation_prompt(record, where)}
            elif not isinstance(prompt, str):
                raise ValueError(f"{where}: field 'prompt' must be a string or a list of chat messages, "
                                 f"got {type(prompt).__name__}")
            elif not prompt.strip():
                blank += 1
                continue
            for name in ("system", "response"):
                if record.get(name) is not None and not isinstance(record[name], str):
                    raise ValueError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
            rows.append(record)
    if not rows:
        raise ValueError(f"{field}: {path} has no usable prompts (rows without a 'prompt' field: {missing}, "
                         f"with an empty 'prompt': {blank}); expected JSONL objects with a non-empty 'prompt'")
    if missing or blank:
        logger.warning("%s: %s: skipped %d rows without a 'prompt' and %d with an empty one",
                       field, path, missing, blank)
    return rows


def conversation_prompt(record: dict, where: str):
    """A chat-message ``prompt`` as the loop keeps it: one user message becomes its text, a longer
    conversation stays a list of ``{"role", "content"}`` messages (JSON, as rows are written)."""
    try:
        prompt, system = prompt_field(record, "prompt")
    except RowError as error:
        raise ValueError(f"{where}: {error}") from None
    if system is not None:
        raise ValueError(f"{where}: field 'prompt' opens with a system message, but the DPA loop writes the "
                         "direction into the system prompt; drop it or move its text into directions.system_prefix")
    return prompt if isinstance(prompt, str) else [dict(message) for message in prompt]


def iteration_prompts(rows: Sequence[dict], iteration: int, per_iteration: int | None = None) -> list[dict]:
    """The prompts of iteration ``t``: the first half of ``rows`` for odd t, the second for even
    t (disjoint, so the policy that samples in iteration t+1 has not been trained on its
    prompts), at most ``per_iteration`` of them."""
    if len(rows) < 2:
        raise ValueError(f"prompts.train: needs at least 2 usable prompts to form two halves, got {len(rows)}")
    middle = (len(rows) + 1) // 2
    half = list(rows[:middle] if iteration % 2 == 1 else rows[middle:])
    return half[:per_iteration] if per_iteration else half


def prompt_directions(config, iteration: int, index: int) -> list[tuple[float, ...]]:
    """The ``directions.per_prompt`` directions of prompt ``index`` (its position in the
    iteration's half) in iteration ``t``: seeded by (seed, t, index) alone, so they do not depend
    on how many prompts run or in which order."""
    d = config.directions
    rng = random.Random(f"dpa-directions:{config.sampling.seed}:{iteration}:{index}")
    if d.sampler == "angle":
        return sample_angle_directions(d.per_prompt, angle_range=d.angle_range, seed=rng)
    return sample_sphere_directions(d.per_prompt, d.signs, seed=rng)


def plan_rows(config, prompt_rows: Sequence[dict], iteration: int) -> list[dict]:
    """One row per (prompt, direction): ``{"prompt", "system", "v", "prompt_index"}`` with the
    direction written into the system prompt."""
    rows = []
    for index, row in enumerate(prompt_rows):
        for v in prompt_directions(config, iteration, index):
            rows.append({"prompt": row["prompt"], "v": list(v), "prompt_index": index,
                         "system": direction_system_prompt(v, config.objectives,
                                                           prefix=config.directions.system_prefix,
                                                           style=config.directions.prompt_style)})
    return rows


def scored_samples(texts: Sequence[str], scores: Sequence[Sequence[float]], v: Sequence[float]) -> list[dict]:
    """``[{"text", "scores", "weighted"}]``: each sample's reward-model scores and ``v . r``."""
    return [{"text": text, "scores": [float(s) for s in score], "weighted": weighted_reward(v, score)}
            for text, score in zip(texts, scores)]


def best_index(samples: Sequence[dict]) -> int:
    """The sample with the highest ``v . r`` (the first of equals)."""
    return max(range(len(samples)), key=lambda j: (samples[j]["weighted"], -j))


def worst_index(samples: Sequence[dict]) -> int:
    """The sample with the lowest ``v . r`` (the last of equals)."""
    return min(range(len(samples)), key=lambda j: (samples[j]["weighted"], -j))


def chosen_examples(scored_rows: Sequence[dict]) -> list[dict]:
    """The best sample of every (prompt, direction) row, as an SFT example with its direction in
    the system prompt (plus ``v``, ``scores``, ``weighted`` for inspection)."""
    examples = []
    for row in scored_rows:
        best = row["samples"][best_index(row["samples"])]
        examples.append({"prompt": row["prompt"], "response": best["text"], "system": row["system"],
                         "v": row["v"], "scores": best["scores"], "weighted": best["weighted"]})
    return examples


def best_worst_pairs(scored_rows: Sequence[dict]) -> tuple[list[dict], int]:
    """``(pairs, skipped)``: per (prompt, direction) the best sample by ``v . r`` preferred over
    the worst; rows whose best and worst tie (or have the same text) give no preference and are
    skipped."""
    pairs, skipped = [], 0
    for row in scored_rows:
        samples = row["samples"]
        best, worst = samples[best_index(samples)], samples[worst_index(samples)]
        if best["weighted"] <= worst["weighted"] or best["text"] == worst["text"]:
            skipped += 1
            continue
        pairs.append({"prompt": row["prompt"], "system": row["system"], "chosen": best["text"],
                      "rejected": worst["text"], "v": row["v"], "margin": best["weighted"] - worst["weighted"]})
    return pairs, skipped


def replay_pool(rows: Sequence[dict]) -> list[dict]:
    """Rows with an original ``response``, as SFT examples ``{prompt, response, system?}``."""
    pool = []
    for row in rows:
        response = row.get("response")
        if isinstance(response, str) and response.strip():
            example = {"prompt": row["prompt"], "response": response}
            if isinstance(row.get("system"), str):
                example["system"] = row["system"]
            pool.append(example)
    return pool


def replay_examples(pool: Sequence[dict], num_selected: int, fraction: float, *, seed: int,
                    iteration: int) -> list[dict]:
    """``round(fraction / (1 - fraction) * num_selected)`` rows of ``pool`` (seeded draw without
    replacement, all of them when the pool is smaller): the replayed rows are then ``fraction``
    of the fine-tuning set."""
    if fraction <= 0 or not pool:
        return []
    count = min(len(pool), round(fraction / (1 - fraction) * num_selected))
    if count < round(fraction / (1 - fraction) * num_selected):
        logger.warning("replay: wanted %d original responses, the pool has %d",
                       round(fraction / (1 - fraction) * num_selected), len(pool))
    rng = random.Random(f"dpa-replay:{seed}:{iteration}")
    return [dict(pool[i]) for i in sorted(rng.sample(range(len(pool)), count))]


def sft_rows(examples: Sequence[dict]) -> list[dict]:
    """Only the fields an SFT data file has."""
    return [{k: e[k] for k in ("prompt", "response", "system") if e.get(k) is not None} for e in examples]
