"""Command line: ``pyalign train``, ``pyalign eval``, ``pyalign config``.

    pyalign train CONFIG.yaml [--recompute-stale-cache] [--device cpu]
    pyalign eval CONFIG.yaml [--split eval|train] [--json OUT.json]
    pyalign eval MODEL_DIR --data pairs.jsonl [--ref REF_DIR] [--beta 0.1] [--json OUT.json]
    pyalign config [CONFIG.yaml]      # the field reference, or check a config and print it resolved

Also ``python -m pyalign ...``. Exit status 2 on a bad config or arguments, 1 on other errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyalign", description="Preference alignment: DPO, APO, SPO training.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train every round of a config (resumes an interrupted run)")
    train.add_argument("config", help="YAML config (see `pyalign config` and docs/training.md)")
    train.add_argument("--recompute-stale-cache", action="store_true",
                       help="recompute cached frozen log-probs whose key no longer matches, instead of refusing")
    train.add_argument("--device", help="override training.device (auto, cpu, cuda, cuda:N)")
    train.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")

    evaluate = commands.add_parser("eval", help="evaluate a run (CONFIG.yaml) or a model folder on pairs")
    evaluate.add_argument("target", help="a training config, or a model folder")
    evaluate.add_argument("--data", nargs="+", help="JSONL pair files (model folder target)")
    evaluate.add_argument("--ref", help="reference model folder for implicit rewards (model folder target)")
    evaluate.add_argument("--beta", type=float, default=0.1, help="beta of the implicit reward (model folder target)")
    evaluate.add_argument("--max-length", type=int, default=512)
    evaluate.add_argument("--max-prompt-length", type=int, default=256)
    evaluate.add_argument("--split", choices=("eval", "train"), default="eval", help="data of a config's rounds")
    evaluate.add_argument("--batch-size", type=int, default=None)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--json", help="also write the results to this JSON file")

    config = commands.add_parser("config", help="print the config reference, or check and print a config")
    config.add_argument("config", nargs="?", help="YAML config to check")
    return parser


def _train(args) -> int:
    from pyalign.train.config import load_config  # noqa: PLC0415
    from pyalign.train.sequential import run_sequential  # noqa: PLC0415

    config = load_config(args.config)
    if args.device:
        from pyalign.train.config import device_name  # noqa: PLC0415

        config.training.device = device_name("--device", args.device)
    if args.no_progress:
        config.training.progress_bar = False
    result = run_sequential(config, recompute_stale_cache=args.recompute_stale_cache or None)
    for n, (directory, metrics) in enumerate(zip(result.round_dirs, result.metrics), start=1):
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.get("eval", {}).items())
        print(f"round {n}: {directory}" + (f"  eval: {shown}" if shown else ""))
    print(f"final model: {result.final_model_dir}")
    return 0


def _eval(args) -> int:
    from pyalign.train import evaluate  # noqa: PLC0415

    target = Path(args.target)
    if target.is_file():
        if args.data or args.ref:
            raise ValueError("--data/--ref: only for a model folder target; a config evaluates its own rounds")
        table = evaluate.evaluate_run(target, split=args.split, batch_size=args.batch_size)
        print(evaluate.format_run_table(table))
        result = table
    elif target.is_dir():
        if not args.data:
            raise ValueError("--data: a model folder target needs at least one JSONL pair file")
        result = evaluate.evaluate_model(
            target, args.data, ref_dir=args.ref, beta=args.beta, max_length=args.max_length,
            max_prompt_length=args.max_prompt_length, batch_size=args.batch_size or 8, device=args.device,
        )
        for name, metrics in result.items():
            print(name + ": " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    else:
        raise FileNotFoundError(f"{target}: neither a config file nor a model folder")
    if args.json:
        evaluate.write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def _config(args) -> int:
    from pyalign.train.config import describe_fields, load_config  # noqa: PLC0415

    if args.config is None:
        print(describe_fields())
    else:
        print(json.dumps(load_config(args.config).to_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from pyalign.train.config import ConfigError  # noqa: PLC0415
    from pyalign.train.logprob_cache import StaleLogprobCacheError  # noqa: PLC0415

    try:
        return {"train": _train, "eval": _eval, "config": _config}[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"pyalign {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (StaleLogprobCacheError, RuntimeError) as error:
        print(f"pyalign {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
