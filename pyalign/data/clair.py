"""CLAIR: Contrastive Learning from AI Revisions (D'Oosterlinck et al., the APO paper; docs/data.md).

For each prompt x: ``y_l = M(x)`` is sampled from the target model M, and ``y_w = Reviser(x, y_l)``
is a minimal revision of it by a (stronger) reviser, prompted to make the answer clearer, more
correct and more engaging while copying everything it does not correct. The pair differs only
where the revision improved the answer, which is the contrast preference training should learn.

A prompt is a text or a conversation (chat messages ending with the user's turn). The target
model gets the conversation through its chat template (:func:`pyalign.generation.generate`); the
reviser's instruction puts it in the ``{task}`` field as role-labelled turns
(:func:`render_prompt`), the same request for a local and an endpoint reviser.

Revisers: a local transformers model (:class:`LocalReviser`), an OpenAI-compatible endpoint
(:class:`EndpointReviser`), or a program (:class:`ProgramReviser`, ``fix(prompt, y_l) -> y_w``,
e.g. one that knows the right answer and edits it in: the APO/CLAIR demo, docs/experiments.md),
which gets the prompt and y_l themselves instead of the instruction.

Filters (the paper's appendix A.2): a revision is dropped when the reviser broke the answer
format (``output_format="markers"``: no ``{corrected_student_solution}`` identifier, as in the
authors' parser) or changed the length too much (``len(y_w) / len(y_l)`` in characters outside
``[min_length_ratio, max_length_ratio]``; the paper gives no numbers, the defaults 0.5 / 2.0 drop
revisions that halve or double the answer). Pairs whose revision is identical to y_l carry no
preference and are dropped too.

Files (``out`` = ``pairs.jsonl``)::

    pairs.jsonl            kept pairs (pyalign's pairs schema; meta: index, rationale, length ratio)
    pairs.samples.jsonl    y_l of every prompt (pyalign.generation.generate_jsonl)
    pairs.rejected.jsonl   dropped prompts with y_l, the reviser's answer and the reason
    pairs.summary.json     counts

Resumable: y_l samples are resumed by :func:`pyalign.generation.generate_jsonl`; revisions are
written one row per prompt, in prompt order, to ``pairs.jsonl`` or ``pairs.rejected.jsonl``
(:class:`pyalign.io.JsonlAppender`), so a killed run continues after the last written row. Rows
carry the fingerprint of the settings, target model and reviser that made them; resuming with
other ones is refused. Every y_l has its own seeded stream, and a local reviser decodes with its
own seed per request, so a resumed run writes the same files as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from pyalign.io import JsonlAppender, read_jsonl_rows, write_json_atomic

logger = logging.getLogger("pyalign.data")

# The reviser prompt of the authors' release (ContextualAI/CLAIR_and_APO, CLAIR_preferences.ipynb),
# with their {input}/{output} fields named {prompt}/{response}; literal braces are doubled.
PAPER_INSTRUCTION = (
    "You are a teacher and your task is to minimally improve a student's answer. I will give you a {{task}} "
    "and a {{student_solution}}. Your job is to revise the {{student_solution}} such that it is clearer, more "
    "correct, and more engaging. Copy all non-corrected parts of the student's answer. Do not allude to the "
    "{{corrected_student_solution}} being a revision or a correction in your final solution.\n\n"
    "{{task}}: {prompt}\n\n{{student_solution}}: {response}\n\n-----------------\n\n"
    "Let's first think step by step with a {{teacher_reasoning}} to decide how to improve the "
    "{{student_solution}}, then give the {{corrected_student_solution}}. Mention the {{teacher_reasoning}} "
    "and {{corrected_student_solution}} identifiers to structure your answer.\n\n"
)
# The authors' parser: the revision follows the first of these markers found.
REVISION_MARKERS = ("**Corrected Student Solution:**", "{corrected_student_solution}:", "{corrected_student_solution}")
OUTPUT_FORMATS = ("markers", "plain")
REASONS = ("format", "length_ratio", "unchanged", "empty_response")
CLAIR_VERSION = 1


@dataclass(frozen=True)
class ClairSettings:
    instruction: str = PAPER_INSTRUCTION  # with {prompt} and {response}
    output_format: str = "markers"  # markers: the paper's identifiers; plain: the whole answer is y_w
    min_length_ratio: float = 0.5
    max_length_ratio: float = 2.0
    max_new_tokens: int = 256  # y_l
    temperature: float = 0.7  # y_l sampling
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16  # y_l generation batch
    chunk_size: int = 16  # prompts revised between writes

    def __post_init__(self):
        if not isinstance(self.instruction, str) or "{prompt}" not in self.instruction \
                or "{response}" not in self.instruction:
            raise ValueError("instruction: expected a text with the fields {prompt} and {response} "
                             "(other literal braces doubled: {{ }})")
        try:
            self.instruction.format(prompt="", response="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"instruction: not a valid template ({error!r}); double literal braces: {{{{ }}}}") from None
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format: expected one of {', '.join(OUTPUT_FORMATS)}, got {self.output_format!r}")
        if not 0 < self.min_length_ratio <= 1 <= self.max_length_ratio:
            raise ValueError(f"min_length_ratio/max_length_ratio: expected 0 < min <= 1 <= max, got "
                             f"{self.min_length_ratio} / {self.max_length_ratio}")
        for name in ("chunk_size", "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")

    def request(self, prompt, response: str) -> str:
        return self.instruction.format(prompt=render_prompt(prompt), response=response)


def render_prompt(prompt) -> str:
    """The prompt as the reviser instruction's ``{task}``: a text as it is (the paper's case);
    a conversation as its turns, each ``"User: ..."`` / ``"Assistant: ..."`` (``"System: ..."``),
    separated by blank lines, so the student's answer reads as the next assistant turn."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def parse_revision(answer: str, output_format: str = "markers") -> tuple[str | None, str | None]:
    """``(revision, rationale)`` from a reviser's answer; revision None when the format is broken."""
    if output_format == "plain":
        return (answer.strip() or None), None
    for marker in REVISION_MARKERS:
        if marker in answer:
            before, _, after = answer.partition(marker)
            rationale = before
            if "{teacher_reasoning}" in rationale:
                rationale = rationale.split("{teacher_reasoning}", 1)[1].lstrip(":")
            return (after.strip() or None), rationale.strip()
    return None, None


def rejection_reason(rejected: str, revision: str | None, settings: ClairSettings) -> str | None:
    """Why a revision is dropped (one of :data:`REASONS`), or None when the pair is kept."""
    if not rejected.strip():
        return "empty_response"
    if revision is None:
        return "format"
    if revision.strip() == rejected.strip():
        return "unchanged"
    ratio = len(revision) / len(rejected)
    if not settings.min_length_ratio <= ratio <= settings.max_length_ratio:
        return "length_ratio"
    return None


# ----------------------------------------------------------------------------- revisers

class LocalReviser:
    """A local transformers model revising through :func:`pyalign.generation.generate` (greedy at
    ``temperature=0``; else sampled, each request from its own seeded stream)."""

    def __init__(self, model, tokenizer, *, name: str, max_new_tokens: int = 1024, temperature: float = 0.0,
                 seed: int = 0, batch_size: int = 16):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_new_tokens, self.temperature, self.seed, self.batch_size = max_new_tokens, temperature, seed, batch_size

    @classmethod
    def from_folder(cls, path, *, dtype: str = "float32", **kwargs) -> LocalReviser:
        from pyalign.generation import load_for_generation  # noqa: PLC0415
        from pyalign.models import model_fingerprint  # noqa: PLC0415

        model, tokenizer = load_for_generation(path, backend="hf", dtype=dtype)
        return cls(model, tokenizer, name=f"{Path(path).resolve()}#{model_fingerprint(path)[:16]}", **kwargs)

    def describe(self) -> dict:
        return {"kind": "local", "model": self.name, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "seed": self.seed}

    def revise(self, requests: Sequence[str]) -> list[str]:
        from pyalign.generation import generate  # noqa: PLC0415

        greedy = self.temperature == 0
        samples = generate(self.model, self.tokenizer, list(requests), n=1, max_new_tokens=self.max_new_tokens,
                           do_sample=not greedy, temperature=1.0 if greedy else self.temperature, seed=self.seed,
                           batch_size=self.batch_size, progress=None, backend="hf")
        return [s[0].text for s in samples]


class EndpointReviser:
    """An OpenAI-compatible chat-completions endpoint (:class:`pyalign.data.chat_client.ChatCompletionsClient`),
    ``concurrency`` requests in flight."""

    def __init__(self, client, *, max_tokens: int = 1024, temperature: float = 0.0, seed: int | None = 0,
                 concurrency: int = 4):
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency: expected an integer >= 1, got {concurrency!r}")
        self.client, self.max_tokens, self.temperature, self.seed, self.concurrency = \
            client, max_tokens, temperature, seed, concurrency

    def describe(self) -> dict:
        return {**self.client.describe(), "max_tokens": self.max_tokens, "temperature": self.temperature,
                "seed": self.seed}

    def revise(self, requests: Sequence[str]) -> list[str]:
        def ask(text: str) -> str:
            return self.client.complete([{"role": "user", "content": text}], max_tokens=self.max_tokens,
                                        temperature=self.temperature, seed=self.seed)

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(ask, requests))


class ProgramReviser:
    """A reviser that is a program, ``fix(prompt, response) -> revision``: e.g. one that knows the
    right answer and edits it into the response, keeping the rest of the text (the APO/CLAIR demo,
    :func:`pyalign.demo.checkable.revise_answer`). It gets the prompt and y_l themselves, not the
    instruction, and answers with the revision alone, so it needs ``output_format="plain"``.
    ``name`` identifies the program in the files' fingerprint (change it when the program changes)."""

    def __init__(self, fix, *, name: str):
        if not callable(fix):
            raise ValueError(f"fix: expected a function (prompt, response) -> revision, got {fix!r}")
        self.fix, self.name = fix, name

    def describe(self) -> dict:
        return {"kind": "program", "name": self.name}

    def revise_responses(self, prompts: Sequence, responses: Sequence[str]) -> list[str]:
        return [self.fix(prompt, response) for prompt, response in zip(prompts, responses)]


# ----------------------------------------------------------------------------- prompts

def load_prompts(source, *, limit: int | None = None) -> list[tuple]:
    """``(prompt, system)`` of a source: rows of ``{prompt, system?}``, or the prompts of any pair
    source (each once, in order). A prompt is a text or a tuple of chat messages (multi-turn)."""
    from pyalign.data.pairs import RowError, prompt_field, text_field  # noqa: PLC0415
    from pyalign.data.sources import iter_pairs, parse_source, read_rows  # noqa: PLC0415
    from pyalign.generation import hashable_prompt  # noqa: PLC0415

    source = parse_source(source, "PROMPTS")
    table = read_rows(source)
    prompts: list[tuple] = []
    if source.schema is None and set(table.columns) <= {"prompt", "system", "meta", "id"} and "prompt" in table.columns:
        for index, row in table.rows:
            try:
                prompts.append(prompt_field(row, "prompt", text_field(row, "system", optional=True)))
            except RowError as error:
                raise ValueError(f"{table.describe(index)}: {error}") from None
    else:
        from dataclasses import replace  # noqa: PLC0415

        from pyalign.data.sources import schema_adapter  # noqa: PLC0415

        adapter = schema_adapter(source, table)
        if adapter.dimensions and source.dimension is None:
            source = replace(source, schema=adapter.name, dimension=adapter.dimensions[0])
        pairs, _ = iter_pairs(source)
        prompts = [(pair.prompt, pair.system) for _, pair in pairs]
    first = {}
    for prompt, system in prompts:
        first.setdefault((hashable_prompt(prompt), system), (prompt, system))
    unique = list(first.values())
    return unique[:limit] if limit is not None else unique


# ----------------------------------------------------------------------------- the run

def output_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    base = out.with_suffix("") if out.suffix == ".jsonl" else out
    return {"pairs": out, "samples": Path(f"{base}.samples.jsonl"), "rejected": Path(f"{base}.rejected.jsonl"),
            "summary": Path(f"{base}.summary.json"), "target": Path(f"{base}.samples.model.json")}


def _fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _load_target(model, dtype: str):
    """``(model, tokenizer, identity)`` from a folder or a ``(model, tokenizer, name)`` tuple."""
    if isinstance(model, tuple):
        return model
    from pyalign.generation import load_for_generation  # noqa: PLC0415
    from pyalign.models import model_fingerprint  # noqa: PLC0415

    loaded, tokenizer = load_for_generation(model, backend="hf", dtype=dtype)
    return loaded, tokenizer, f"{Path(model).resolve()}#{model_fingerprint(model)[:16]}"


def _done_rows(paths: dict, fingerprint: str, total: int) -> int:
    """How many prompts earlier runs finished (checked: same settings, rows 0..k-1 once each)."""
    indices = []
    for name in ("pairs", "rejected"):
        for position, row in enumerate(read_jsonl_rows(paths[name])):
            meta = row.get("meta", {}) if name == "pairs" else row
            if meta.get("clair") != fingerprint:
                raise ValueError(f"{paths[name]}: row {position} was made with other CLAIR settings, target model "
                                 "or reviser (a stale file: delete it or write elsewhere)")
            indices.append(meta.get("index"))
    if sorted(indices) != list(range(len(indices))) or len(indices) > total:
        raise ValueError(f"{paths['pairs']}: the rows already written do not cover prompts 0..{len(indices) - 1} "
                         "once each (files from another run?)")
    return len(indices)


def make_clair_pairs(prompts: Sequence[tuple], model, reviser, out: str | Path, *,
                     settings: ClairSettings = ClairSettings(), dtype: str = "float32", progress: bool = True) -> dict:
    """Sample y_l for every prompt, revise, filter, write (resuming whatever is there). ``prompts``:
    ``(prompt, system)`` with a text or chat-message prompt (:func:`load_prompts`). ``model``:
    the target model's folder, or ``(model, tokenizer, name)``. Returns the summary."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    from pyalign.data.pairs import prompt_json  # noqa: PLC0415
    from pyalign.generation import check_prompts, generate_jsonl  # noqa: PLC0415

    paths = output_paths(out)
    if hasattr(reviser, "revise_responses") and settings.output_format != "plain":
        raise ValueError("output_format: a program reviser answers with the revision alone; use 'plain'")
    prompts = [(p, s) for p, s in prompts]
    if not prompts:
        raise ValueError("prompts: no prompts to make pairs from")
    checked, systems = check_prompts([p for p, _ in prompts], [s for _, s in prompts])  # before loading a model
    prompts = list(zip(checked, systems))
    target_model, tokenizer, target_name = _load_target(model, dtype)

    # y_l: the samples file is keyed by prompt and sampling settings; the target model is checked here.
    target = {"model": target_name}
    if paths["target"].is_file() and json.loads(paths["target"].read_text(encoding="utf-8")) != target:
        raise ValueError(f"{paths['samples']}: made with another target model "
                         f"({paths['target'].read_text(encoding='utf-8').strip()}); delete it or write elsewhere")
    write_json_atomic(paths["target"], target)
    samples = generate_jsonl(
        paths["samples"], target_model, tokenizer, [p for p, _ in prompts], system=[s for _, s in prompts], n=1,
        max_new_tokens=settings.max_new_tokens, do_sample=True, temperature=settings.temperature,
        top_p=settings.top_p, seed=settings.seed, batch_size=settings.batch_size,
        progress="sampling y_l" if progress else None, backend="hf",
    )
    rejected_texts = [s[0].text for s in samples]

    # batch and chunk sizes change how the work is cut, not its result
    decisive = {k: v for k, v in asdict(settings).items() if k not in ("batch_size", "chunk_size")}
    fingerprint = _fingerprint({"version": CLAIR_VERSION, "settings": decisive, "target": target_name,
                                "reviser": reviser.describe()})
    start = _done_rows(paths, fingerprint, len(prompts))
    with JsonlAppender(paths["pairs"]) as kept, JsonlAppender(paths["rejected"]) as dropped, \
            tqdm(total=len(prompts), initial=start, desc="revising", disable=not progress, leave=False) as bar:
        for chunk_start in range(start, len(prompts), settings.chunk_size):
            chunk = range(chunk_start, min(chunk_start + settings.chunk_size, len(prompts)))
            if hasattr(reviser, "revise_responses"):  # a program reviser: the prompt and y_l themselves
                answers = reviser.revise_responses([prompts[i][0] for i in chunk], [rejected_texts[i] for i in chunk])
            else:
                answers = reviser.revise([settings.request(prompts[i][0], rejected_texts[i]) for i in chunk])
            for i, answer in zip(chunk, answers):
                prompt, system = prompts[i]
                revision, rationale = parse_revision(answer, settings.output_format)
                reason = rejection_reason(rejected_texts[i], revision, settings)
                if reason is None:
                    record = {"prompt": prompt_json(prompt), "chosen": revision, "rejected": rejected_texts[i]}
                    if system is not None:
                        record["system"] = system
                    record["meta"] = {"index": i, "clair": fingerprint, "rationale": rationale,
                                      "length_ratio": round(len(revision) / len(rejected_texts[i]), 4)}
                    kept.write(record)
                else:
                    dropped.write({"index": i, "clair": fingerprint, "reason": reason, "prompt": prompt_json(prompt),
                                   "system": system, "response": rejected_texts[i], "answer": answer})
                bar.update(1)

    reasons = Counter(row["reason"] for row in read_jsonl_rows(paths["rejected"]))
    summary = {"prompts": len(prompts), "kept": len(read_jsonl_rows(paths["pairs"])),
               "rejected": {reason: reasons.get(reason, 0) for reason in REASONS},
               "reviser": reviser.describe(), "target_model": target_name, "files": {k: str(v) for k, v in paths.items()}}
    write_json_atomic(paths["summary"], summary)
    logger.info("CLAIR: %d of %d prompts kept (%s)", summary["kept"], len(prompts), dict(reasons))
    return summary
