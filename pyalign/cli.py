"""Command line: ``pyalign train``, ``pyalign eval``, ``pyalign config``.

    pyalign train CONFIG.yaml [--device cpu] [--output-dir DIR] [--num-threads N] [--recompute-stale-cache]
    pyalign eval CONFIG.yaml [--split eval|train] [--json OUT.json]
    pyalign eval MODEL_DIR --data pairs.jsonl [--ref REF_DIR] [--beta 0.1] [--json OUT.json]
    pyalign config [CONFIG.yaml] [--task NAME]   # the field reference, or check a config and print it resolved
    torchrun --nproc_per_node 2 -m pyalign train CONFIG.yaml                # several processes
    pyalign data inspect SOURCE [--schema NAME] [--json]   # a data source as pyalign sees it (docs/data.md)

Also ``python -m pyalign ...``. Exit status 0 when done; 2 on a bad config, argument, data or
state file, or an I/O failure (disk full, permission denied, ...), reported in one line naming the
file; 1 when a run is refused for its state (settings changed since a stage finished, ...); 75
when a run stopped on a preemption signal after writing a checkpoint (130 for Ctrl-C): run the same
command again to resume (docs/training.md, "Failure modes"). A subcommand is a parser-building
function and a handler in :data:`COMMANDS`; add one there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="train the config's task (resumes an interrupted run)")
    train.add_argument("config", help="YAML config; its `task:` (default preference) says what it trains "
                                      "(see `pyalign config` and docs/training.md)")
    train.add_argument("--recompute-stale-cache", action="store_true",
                       help="recompute cached frozen log-probs whose key no longer matches, instead of refusing")
    train.add_argument("--device", help="override training.device (auto, cpu, cuda, cuda:N)")
    train.add_argument("--output-dir", help="override output_dir")
    train.add_argument("--num-threads", type=int, help="override training.num_threads (torch CPU threads per process)")
    train.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _add_eval(commands) -> None:
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


def _add_config(commands) -> None:
    config = commands.add_parser("config", help="print the config reference, or check and print a config")
    config.add_argument("config", nargs="?", help="YAML config to check")
    config.add_argument("--task", help="only this task's fields (default: every task's)")
    config.add_argument("--schema", action="store_true",
                        help="print the JSON Schema of a config file (the task's, or every task's chosen by its "
                             "task: field), for editors that complete and check YAML")


def _train(args) -> int:
    from pyalign import distributed  # noqa: PLC0415
    from pyalign.train import ConfigError, device_name, load_config, path_value, positive_int, task_of  # noqa: PLC0415

    config = load_config(args.config)
    task = task_of(config)
    training = getattr(config, "training", None)
    if args.device:
        if training is None:
            raise ConfigError(f"--device: task {task.name} has no training section")
        training.device = device_name("--device", args.device)
    if args.num_threads is not None:
        if training is None:
            raise ConfigError(f"--num-threads: task {task.name} has no training section")
        training.num_threads = positive_int("--num-threads", args.num_threads)
    if args.output_dir:
        if not hasattr(config, "output_dir"):
            raise ConfigError(f"--output-dir: task {task.name} has no output_dir")
        config.output_dir = path_value("--output-dir", args.output_dir)
    if args.no_progress and training is not None:
        training.progress_bar = False
    if args.recompute_stale_cache:
        if not hasattr(config, "recompute_stale_cache"):
            raise ConfigError(f"--recompute-stale-cache: task {task.name} has no frozen log-prob cache")
        config.recompute_stale_cache = True
    result = task.run(config)
    if distributed.is_main():
        for line in task.summary(result) if task.summary else [str(result)]:
            print(line)
    distributed.shutdown()
    return 0


def _eval(args) -> int:
    from pyalign.tasks.preference import evaluate  # noqa: PLC0415

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
    from pyalign.train import config_schema, config_to_dict, describe_fields, load_config  # noqa: PLC0415

    if args.schema:
        if args.config is not None:
            raise ValueError("--schema: prints the schema of a task's config (use --task), not of a file")
        print(json.dumps(config_schema(args.task), indent=2))
    elif args.config is None:
        print(describe_fields(args.task))
    else:
        print(json.dumps(config_to_dict(load_config(args.config, task=args.task)), indent=2))
    return 0


def _add_data(commands) -> None:
    from pyalign.data.cli import add_data_parser  # noqa: PLC0415

    add_data_parser(commands)


def _data(args) -> int:
    from pyalign.data.cli import run_data  # noqa: PLC0415

    return run_data(args)


# name -> (adds its parser to the subparsers, handles the parsed arguments and returns the exit status)
COMMANDS = {
    "train": (_add_train, _train),
    "eval": (_add_eval, _eval),
    "config": (_add_config, _config),
    "data": (_add_data, _data),  # pyalign data inspect|clair (pyalign/data/cli.py)
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyalign", description="Preference alignment: DPO, APO, SPO, SFT training.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_parser, _ in COMMANDS.values():
        add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # 2 MiB pages for tensors >= 2 MiB: a fresh logits-sized gradient otherwise faults in every
    # 4 KiB page each step (docs/DESIGN.md, "the fresh gradient"). torch reads the variable at its
    # first such allocation, so it is set before anything is built; a user's own value wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    args = _parser().parse_args(argv)
    # one process's console output in a multi-process run: the others log warnings only
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from pyalign.failures import exit_report  # noqa: PLC0415
    from pyalign.train.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED  # noqa: PLC0415

    try:
        return COMMANDS[args.command][1](args)
    except (Exception, KeyboardInterrupt) as error:
        report = exit_report(error)
        if report is None:
            raise
        status, message = report
        # a stop on a signal is not an error: the message says how the run resumes
        prefix = "" if status in (EXIT_PREEMPTED, EXIT_INTERRUPTED) else "error: "
        print(f"pyalign {args.command}: {prefix}{message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
