"""``pyalign data``: look at a data source as pyalign sees it, and make CLAIR pairs.

    pyalign data inspect SOURCE [--schema NAME] [--dimension NAME] [--limit N] [--json] [--model DIR]
    pyalign data export SOURCE --out pairs.jsonl [--ratings]     # pyalign JSONL of pairs / rating records
    pyalign data clair PROMPTS --model TARGET --out pairs.jsonl (--reviser-model DIR | --reviser-url URL ...)

SOURCE is a local file or folder, or a hub data set name (``owner/name``). ``inspect`` prints the
first records after the schema mapping and the chat template (token ids decoded back, so what you
read is what trains); ``--json`` prints one JSON object per record with ``prompt`` (text, or a
list of chat messages), ``chosen``, ``rejected`` and ``system`` (null when absent).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from pyalign.data.adapters import SCHEMAS
from pyalign.data.pairs import prompt_json


def add_data_parser(commands) -> None:
    """The ``data`` subcommand, added to ``pyalign``'s subparsers."""
    _add_subcommands(commands.add_parser("data", help="inspect a data source as pyalign sees it; "
                                                      "make CLAIR revision pairs"))


def _add_subcommands(data) -> None:
    sub = data.add_subparsers(dest="data_command", required=True)

    inspect = sub.add_parser("inspect", help="print the first records of a source after the schema mapping "
                                             "and the chat template")
    _source_arguments(inspect, "SOURCE: a local file or folder (JSONL, JSON, parquet, CSV, arrow, save_to_disk), "
                               "or a hub data set name owner/name")
    inspect.add_argument("--limit", type=int, default=3, help="records to print (default 3)")
    inspect.add_argument("--json", action="store_true",
                         help="one JSON object per record: prompt (text or chat messages), chosen, rejected, system")
    inspect.add_argument("--model", default="smollm2",
                         help="model folder whose tokenizer and chat template to apply (default smollm2: "
                              "SmolLM2-135M-Instruct from pyalign.models.smollm2_path())")
    inspect.add_argument("--max-length", type=int, default=512, help="prompt + response tokens (training default 512)")
    inspect.add_argument("--max-prompt-length", type=int, default=256, help="prompt tokens kept (default 256)")

    export = sub.add_parser("export", help="write a source's records as pyalign JSONL (pairs, or rating records)")
    _source_arguments(export, "SOURCE: a local file or folder, or a hub data set name owner/name")
    export.add_argument("--out", required=True, help="output JSONL (written atomically)")
    export.add_argument("--ratings", action="store_true",
                        help="rating records {prompt, response, ratings} (helpsteer2 / ratings schemas) instead of pairs")

    clair = sub.add_parser("clair", help="CLAIR pairs: sample y_l from the target model, revise it minimally "
                                         "with a reviser into y_w (resumable)")
    _source_arguments(clair, "PROMPTS: a source of prompts (JSONL of {prompt, system?}, or any pair source: "
                             "its prompts are used)")
    clair.add_argument("--model", required=True, help="target model folder (y_l is sampled from it)")
    clair.add_argument("--out", required=True, help="output JSONL of kept pairs (resumed if it exists); "
                                                    "<out>.samples.jsonl, <out>.rejected.jsonl, <out>.summary.json beside it")
    clair.add_argument("--limit", type=int, default=None, help="first N prompts only")
    group = clair.add_argument_group("reviser (one of)")
    group.add_argument("--reviser-model", help="local transformers model folder as the reviser")
    group.add_argument("--reviser-url", help="OpenAI-compatible endpoint base URL, e.g. https://api.openai.com/v1")
    clair.add_argument("--reviser-name", help="model name sent to the endpoint (--reviser-url)")
    clair.add_argument("--api-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the endpoint's API key (default OPENAI_API_KEY; "
                            "the key itself is never printed or written)")
    clair.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one endpoint answer")
    clair.add_argument("--retries", type=int, default=5, help="retries of a failed endpoint request")
    clair.add_argument("--concurrency", type=int, default=4, help="endpoint requests in flight")
    clair.add_argument("--instruction", help="file with a custom revision instruction ({prompt}, {response})")
    clair.add_argument("--output-format", choices=("markers", "plain"), default=None,
                       help="markers: the paper's {corrected_student_solution} format (default with the paper's "
                            "instruction); plain: the whole answer is the revision")
    clair.add_argument("--min-length-ratio", type=float, default=None, help="drop revisions shorter than this x y_l")
    clair.add_argument("--max-length-ratio", type=float, default=None, help="drop revisions longer than this x y_l")
    clair.add_argument("--max-new-tokens", type=int, default=256, help="y_l length limit (tokens)")
    clair.add_argument("--reviser-max-new-tokens", type=int, default=1024, help="reviser answer limit (tokens)")
    clair.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of y_l")
    clair.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of y_l")
    clair.add_argument("--reviser-temperature", type=float, default=0.0,
                       help="reviser temperature (0: greedy; the paper used 0.7 with GPT-4-turbo)")
    clair.add_argument("--seed", type=int, default=0)
    clair.add_argument("--batch-size", type=int, default=16, help="local generation batch size")
    clair.add_argument("--dtype", default="float32", help="dtype of local models")


def _source_arguments(parser, help_text: str) -> None:
    parser.add_argument("source", help=help_text)
    parser.add_argument("--schema", choices=SCHEMAS, help="how rows map to records (guessed from the columns when left out)")
    parser.add_argument("--dimension", help="pair stream of a multi-dimension schema, e.g. helpful / harmless "
                                            "(pku_saferlhf) or a HelpSteer attribute")
    parser.add_argument("--split", help="split of a data set with several (default train)")
    parser.add_argument("--config", help="data set configuration name")
    parser.add_argument("--data-dir", help="folder inside the data set, e.g. harmless-base for Anthropic/hh-rlhf")
    parser.add_argument("--relabel", choices=("reward_augmented",), help="reward-augmented relabeling of scored pairs")
    parser.add_argument("--on-bad-row", choices=("fail", "skip"), help="a row that does not fit: fail (default) or skip")


def _source(args):
    from pyalign.data.sources import source_from_cli  # noqa: PLC0415

    return source_from_cli(args.source, schema=args.schema, dimension=args.dimension, split=args.split,
                           config=args.config, data_dir=args.data_dir, relabel=args.relabel,
                           on_bad_row=args.on_bad_row)


def _with_default_dimension(source):
    """``inspect`` without --dimension on a multi-dimension schema shows the first dimension."""
    from dataclasses import replace  # noqa: PLC0415

    from pyalign.data.sources import read_rows, schema_adapter  # noqa: PLC0415

    if source.dimension is not None:
        return source
    adapter = schema_adapter(source, read_rows(source))
    if adapter.dimensions:
        print(f"note: {adapter.name} has one pair stream per dimension ({', '.join(adapter.dimensions)}); "
              f"showing {adapter.dimensions[0]} (choose with --dimension)", file=sys.stderr)
        return replace(source, schema=adapter.name, dimension=adapter.dimensions[0])
    return source


def _load_tokenizer(model: str):
    from transformers import AutoTokenizer  # noqa: PLC0415

    if model == "smollm2":
        from pyalign.models import smollm2_path  # noqa: PLC0415

        model = str(smollm2_path())
    return AutoTokenizer.from_pretrained(model)


def _inspect(args) -> int:
    from pyalign.data.sources import iter_pairs  # noqa: PLC0415
    from pyalign.data.tokenize import tokenize_pair  # noqa: PLC0415

    if args.limit < 1:
        raise ValueError(f"--limit: expected a positive integer, got {args.limit}")
    source = _with_default_dimension(_source(args))
    tokenizer = None if args.json else _load_tokenizer(args.model)
    pairs, report = iter_pairs(source)
    shown = 0
    for index, pair in itertools.islice(pairs, args.limit):
        shown += 1
        if args.json:
            print(json.dumps({"prompt": prompt_json(pair.prompt), "chosen": pair.chosen, "rejected": pair.rejected,
                              "system": pair.system}, ensure_ascii=False))
            continue
        example = tokenize_pair(pair, tokenizer, args.max_length, args.max_prompt_length)
        print(f"=== record {shown} (row {index}; schema {report.schema}"
              + (f", dimension {report.dimension}" if report.dimension else "") + ") ===")
        if pair.chosen_score is not None or pair.rejected_score is not None:
            print(f"scores: chosen {pair.chosen_score:g}, rejected {pair.rejected_score:g}")
        for name, ids in (("prompt", example.prompt_ids), ("chosen", example.chosen_ids),
                          ("rejected", example.rejected_ids)):
            print(f"--- {name} ({len(ids)} tokens{', truncated' if _truncated(tokenizer, pair, name, ids) else ''}) ---")
            print(tokenizer.decode(ids, skip_special_tokens=False))
        print()
    if not args.json:
        print(f"{shown} record(s) shown from {source.label} (schema {report.schema}"
              + (f", dimension {report.dimension}" if report.dimension else "")
              + (f"; {len(report.skipped)} bad row(s) skipped" if report.skipped else "") + ")")
    if shown == 0:
        raise ValueError(f"{source.label}: no preference pairs")
    return 0


def _truncated(tokenizer, pair, name: str, ids) -> bool:
    from pyalign.data.tokenize import encode_prompt, encode_response  # noqa: PLC0415

    full = encode_prompt(tokenizer, pair.prompt, pair.system) if name == "prompt" else \
        encode_response(tokenizer, getattr(pair, name))
    return len(full) != len(ids)


def _export(args) -> int:
    from pyalign.data.sources import load_ratings, load_source  # noqa: PLC0415
    from pyalign.io import write_jsonl_atomic  # noqa: PLC0415

    source = _source(args)
    if args.ratings:
        records = [r.to_record() for r in load_ratings(source)]
        what = "rating records"
    else:
        loaded = load_source(source)
        records = [p.to_record() for p in loaded.pairs]
        what = "pairs"
        print(loaded.report.summary())
    with _output_lock(args.out):
        write_jsonl_atomic(args.out, records)
    print(f"wrote {len(records)} {what} to {args.out}")
    return 0


def _output_lock(out: str):
    """One ``pyalign data`` command per output file at a time (a lock file beside it)."""
    from pathlib import Path  # noqa: PLC0415

    from pyalign.lock import exclusive  # noqa: PLC0415

    out = Path(out).resolve()
    if out.is_dir():
        raise ValueError(f"--out: {out} is a folder, expected a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    return exclusive(out.parent / f".{out.name}.lock", what=f"--out {out}")


def _clair(args) -> int:
    from pyalign.data import clair  # noqa: PLC0415

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit: expected a positive integer, got {args.limit}")
    if bool(args.reviser_model) == bool(args.reviser_url):
        raise ValueError("--reviser-model/--reviser-url: give exactly one reviser")
    options = {}
    if args.instruction:
        with open(args.instruction, encoding="utf-8") as handle:
            options["instruction"] = handle.read()
    for name in ("output_format", "min_length_ratio", "max_length_ratio"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    settings = clair.ClairSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        batch_size=args.batch_size, chunk_size=args.concurrency if args.reviser_url else args.batch_size, **options,
    )
    if args.reviser_url:
        if not args.reviser_name:
            raise ValueError("--reviser-name: the endpoint needs the model name to ask for")
        from pyalign.data.chat_client import ChatCompletionsClient  # noqa: PLC0415

        reviser = clair.EndpointReviser(
            ChatCompletionsClient(args.reviser_url, args.reviser_name, api_key_env=args.api_key_env,
                                  timeout=args.timeout, max_retries=args.retries),
            max_tokens=args.reviser_max_new_tokens, temperature=args.reviser_temperature,
            seed=args.seed, concurrency=args.concurrency,
        )
    else:
        reviser = clair.LocalReviser.from_folder(args.reviser_model, max_new_tokens=args.reviser_max_new_tokens,
                                                 temperature=args.reviser_temperature, seed=args.seed,
                                                 batch_size=args.batch_size, dtype=args.dtype)
    prompts = clair.load_prompts(_source(args), limit=args.limit)
    with _output_lock(args.out):
        summary = clair.make_clair_pairs(prompts, args.model, reviser, args.out, settings=settings, dtype=args.dtype)
    print(json.dumps(summary, indent=2))
    return 0


def run_data(args) -> int:
    return {"inspect": _inspect, "export": _export, "clair": _clair}[args.data_command](args)


def main(argv=None) -> int:
    """``python -m pyalign.data.cli inspect|clair ...``: the same as ``pyalign data ...``."""
    parser = argparse.ArgumentParser(prog="pyalign data", description=__doc__.split("\n")[0])
    _add_subcommands(parser)
    args = parser.parse_args(argv)
    from pyalign.failures import exit_report  # noqa: PLC0415

    try:
        return run_data(args)
    except (Exception, KeyboardInterrupt) as error:
        report = exit_report(error)
        if report is None:
            raise
        print(f"pyalign data {args.data_command}: error: {report[1]}", file=sys.stderr)
        return report[0]


if __name__ == "__main__":
    sys.exit(main())
