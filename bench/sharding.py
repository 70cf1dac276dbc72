"""``python -m bench.sharding``: ddp (``training.sharding: none``) vs fsdp (FSDP2) on this CPU, 1 and 2
processes, LoRA and full fine-tuning, through pyalign's own SFT run (``pyalign.tasks.sft.run_sft``:
the code ``pyalign train`` runs for ``task: sft``).

    flock /tmp/pyalign-cpu.lock python -m bench.sharding                    # SmolLM2-135M + a 0.5B random model
    python -m bench.sharding --models smollm2 --modes full --steps 2       # a subset
    python -m bench.sharding --quick --models PATH                         # seconds, on a tiny HF folder (tests)

Per configuration, a fresh launch (one process, or ``torchrun --standalone --nproc_per_node 2``), so that
peak resident sets do not mix; every configuration trains the same synthetic SFT examples, each cut to
exactly ``--seq-len`` tokens, ``--batch`` sequences per optimizer step over all processes together (the
trainer's ``batch_size`` is global), fp32, ``cores / processes`` torch threads per process. The steps:
``--warmup`` untimed, then ``--steps`` timed; the run is stopped from the step callback after them (no
final checkpoint or model folder: they are not what is measured). Per process:

- step time: the trainer's own ``step_s`` (micro-batches, gradient sync, clipping, AdamW), the slowest
  process's of each step, median over the timed steps;
- peak resident set over the timed steps (``/proc/self/clear_refs`` reset after the warm-up step, then
  ``VmHWM``) and over the process's whole run (the larger of that and ``VmHWM`` read just before the
  reset: model loading and the warm-up step; ``ru_maxrss`` cannot serve, the reset lowers it too);
- state bytes after the last timed step: the local tensors this process holds for the parameters
  (trainable and frozen; FSDP's DTensors count their local shard), their gradients and AdamW's state.

One process runs ``sharding: none`` only: ``sharding: fsdp`` in one process shards nothing and trains
exactly as ``none`` (pyalign.train.sharding.sharding_active). Results:
bench/results/sharding_<device>_<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import common, report

RANDOM_MODEL = "llama-0.5b"
# SmolLM2's family scaled to ~0.5B: SmolLM2-135M's config (tied embeddings, vocabulary 49152, GQA with
# 3 query heads per key/value head, head_dim 64, RoPE theta 1e5) with these sizes.
RANDOM_MODEL_SIZES = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 32,
                      "num_attention_heads": 18, "num_key_value_heads": 6, "head_dim": 64}
LORA = {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
MODES = ("lora", "full")
SHARDINGS = ("none", "fsdp")
LR = 1e-5
RESULT_FILE = "rank{rank}.json"
WORDS = ("the of and to in is for on that with as by at from this be are was it an or which have not has but "
         "were he can his their they we will all more one also its had been new would other than may some these "
         "about into first only time after such most two when there any between made over").split()
QUICK = {"steps": 1, "warmup": 1, "seq_len": 32, "batch": 2, "processes": "2", "modes": "full"}
DEFAULTS = {"steps": 3, "warmup": 1, "seq_len": 128, "batch": 4, "processes": "1,2", "modes": "lora,full"}


# --------------------------------------------------------------------------- models


def random_model_dir() -> Path:
    return Path(os.environ.get("PYALIGN_BENCH_CACHE", Path.home() / ".cache" / "pyalign" / "bench")) / \
        "llama-0.5b-random-seed0"


def random_model_config():
    from transformers import AutoConfig  # noqa: PLC0415

    from pyalign.models import smollm2_path  # noqa: PLC0415

    config = AutoConfig.from_pretrained(smollm2_path())
    for name, value in RANDOM_MODEL_SIZES.items():
        setattr(config, name, value)
    config._model_name_or_path = f"pyalign bench {RANDOM_MODEL}, random init"  # not the GGUF's name
    return config


def build_random_model(directory: Path) -> None:
    """Write the ~0.5B random model (seed 0) with SmolLM2's tokenizer; run in a subprocess of its own
    so the 2 GB it allocates are not counted in the driver."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from pyalign.models import smollm2_path  # noqa: PLC0415

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(random_model_config(), dtype=torch.float32)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(partial)
    os.replace(partial, directory)


def resolve_model(name: str) -> Path:
    if name == "smollm2":
        from pyalign.models import smollm2_path  # noqa: PLC0415

        return Path(smollm2_path())
    if name == RANDOM_MODEL:
        directory = random_model_dir()
        if not (directory / "config.json").is_file():
            directory.parent.mkdir(parents=True, exist_ok=True)
            print(f"[bench.sharding] building {RANDOM_MODEL} in {directory} ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "bench.sharding", "--build-random", str(directory)],
                           cwd=report.REPO_ROOT, check=True)
        return directory
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--models: {name!r} is neither 'smollm2', {RANDOM_MODEL!r} nor an HF model folder")
    return path


def model_facts(path: Path) -> dict:
    """Parameter counts (on the meta device: nothing allocated) and the config's sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA["target_modules"]:
            lora += LORA["r"] * (module.in_features + module.out_features)
    # FSDP's groups (pyalign.train.sharding): the decoder layers (classes in _no_split_modules), and the
    # root, which holds the rest (embeddings, final norm, lm_head) and stays unsharded from forward to backward
    layer_classes = set(model._no_split_modules or ())
    in_layers = sum(p.numel() for m in model.modules() if type(m).__name__ in layer_classes for p in m.parameters())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings")
    return {"parameters": total, "lora_parameters": lora, "root_parameters": total - in_layers,
            "config": {k: getattr(config, k, None) for k in keys}}


# --------------------------------------------------------------------------- data


def write_sft_data(path: Path, examples: int, seq_len: int, seed: int) -> None:
    """Examples whose prompt and response are both longer than their token budgets, so that every
    sequence is cut to exactly ``seq_len`` tokens (the worker checks the batch width)."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    with open(path, "w", encoding="utf-8") as file:
        for _ in range(examples):
            file.write(json.dumps({"prompt": text(seq_len), "response": text(2 * seq_len)}) + "\n")


# --------------------------------------------------------------------------- the worker (every process)


class StopMeasuring(Exception):
    """Raised from the step callback on every process once the timed steps are done."""


def _local_bytes(tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # DTensor: this process's shard
    return local.numel() * local.element_size()


def state_bytes(model, optimizer) -> dict:
    params = list(model.parameters())  # a tied weight is one parameter
    out = {"param_bytes": sum(_local_bytes(p) for p in params),
           "trainable_param_bytes": sum(_local_bytes(p) for p in params if p.requires_grad),
           "grad_bytes": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
           "optimizer_bytes": sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()
                                  if torch.is_tensor(v))}
    out["state_bytes"] = out["param_bytes"] + out["grad_bytes"] + out["optimizer_bytes"]
    return out


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # the resident-set high-water mark restarts from the current resident set
        return True
    except OSError:
        return False


def worker(spec_file: str) -> None:
    from pyalign import distributed  # noqa: PLC0415
    from pyalign.tasks.sft import run_sft  # noqa: PLC0415

    spec = json.loads(Path(spec_file).read_text())
    rank = int(os.environ.get("RANK", "0"))
    config = {
        "task": "sft",
        "model": {"path": spec["model"], "dtype": "float32"},
        "data": {"train": spec["data"]},
        "lora": LORA if spec["mode"] == "lora" else None,
        "training": {"lr": LR, "epochs": 1, "batch_size": spec["batch"], "grad_accum": 1,
                     "max_length": spec["seq_len"], "max_prompt_length": spec["seq_len"] // 4,
                     "warmup_ratio": 0.0, "lr_scheduler": "constant", "seed": 0, "device": "cpu",
                     "mixed_precision": "no", "num_threads": spec["threads"], "save_every": 0,
                     "log_every": 1000, "progress_bar": False, "report_to": [], "sharding": spec["sharding"]},
        "output_dir": spec["output_dir"],
    }
    measured = spec["warmup"] + spec["steps"]
    out: dict = {"rank": rank, "step_s": [], "step_wall_s": [], "loss": []}
    marks = {"last": time.perf_counter()}

    def callback(event: str, info: dict) -> None:
        if event != "step":
            return
        now = time.perf_counter()
        step, trainer = info["step"], info["trainer"]
        out["step_s"].append(info["metrics"]["step_s"])
        out["step_wall_s"].append(now - marks["last"])  # between step ends (first: since the worker began)
        out["loss"].append(info["metrics"].get("loss"))
        if step == 1:  # the work every configuration does: the first step's batch on every process
            widths, tokens = set(), 0
            for indices in trainer.micro_batches_of_step(0):
                batch = trainer.train_data.batch(indices.tolist())
                widths.add(int(batch["input_ids"].shape[1]))
                tokens += int((batch["labels"] != -100).sum())
            out["seq_widths"], out["trained_tokens_per_step"] = sorted(widths), tokens
            out["threads"] = torch.get_num_threads()
            out["world_size"] = distributed.world_size()
            out["sharded"] = trainer.sharded
        if step == spec["warmup"]:
            out["rss_peak_until_warmup_bytes"] = common._proc_status_bytes("VmHWM")  # loading + warm-up step
            out["rss_reset"] = _reset_rss_peak()
            out["rss_after_warmup_bytes"] = common._proc_status_bytes("VmRSS")
        if step == measured:
            out.update(state_bytes(trainer.model, trainer.optimizer))
            out["rss_peak_steps_bytes"] = common._proc_status_bytes("VmHWM") if out.get("rss_reset") else None
            out["rss_peak_life_bytes"] = max(out["rss_peak_until_warmup_bytes"], common._proc_status_bytes("VmHWM"))
            raise StopMeasuring
        marks["last"] = time.perf_counter()

    try:
        run_sft(config, callback=callback)
    except StopMeasuring:
        pass
    finally:
        # No barrier: every process stops after the same step's collectives, and one that failed must
        # not leave the others waiting (torchrun then reports its traceback).
        distributed.shutdown(wait_for_others=False)
    Path(spec["out_dir"], RESULT_FILE.format(rank=rank)).write_text(json.dumps(out))


# --------------------------------------------------------------------------- what the steps spend on (probe)


def comm_worker(spec_file: str) -> None:
    """In 2 (or more) processes at once, one thread each, as the training runs: the time of each
    collective over a model's fp32 parameter bytes, moved in 64 MiB buckets (pyalign's gradient
    all-reduce bucket; FSDP moves one decoder layer at a time: 54 MiB at the 0.5B model's size), and of AdamW's step
    over that many parameters (timed on an eighth of them and scaled: its cost is linear)."""
    import torch.distributed as dist  # noqa: PLC0415

    from pyalign import distributed  # noqa: PLC0415

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    chunk = (16 << 20) // world * world  # 64 MiB of fp32, divisible by the processes
    buckets = -(-spec["elements"] // chunk)
    scale = spec["elements"] / (buckets * chunk)  # the last bucket is partial in the real thing
    full, shard = torch.ones(chunk), torch.ones(chunk // world)
    ops = {"all_reduce_s": lambda: dist.all_reduce(full),
           "all_gather_s": lambda: dist.all_gather_into_tensor(full, shard),
           "reduce_scatter_s": lambda: dist.reduce_scatter_tensor(shard, full)}
    out: dict = {"rank": dist.get_rank(), "world": world, "elements": spec["elements"], "bucket_bytes": 4 * chunk}
    for name, op in ops.items():
        times = []
        for _ in range(spec["repeats"] + 1):  # the first round warms gloo's buffers up
            dist.barrier()
            start = time.perf_counter()
            for _ in range(buckets):
                op()
            dist.barrier()
            times.append((time.perf_counter() - start) * scale)
        out[name] = statistics.median(times[1:])
    part = max(1, buckets // 8)
    params = [torch.nn.Parameter(torch.zeros(chunk)) for _ in range(part)]
    for param in params:
        param.grad = torch.full_like(param, 1e-3)
    optimizer = torch.optim.AdamW(params, lr=LR)  # the trainer's optimizer, same defaults
    optimizer.step()  # allocates the moments
    times = []
    for _ in range(spec["repeats"]):
        dist.barrier()
        start = time.perf_counter()
        optimizer.step()
        times.append((time.perf_counter() - start) * spec["elements"] / (part * chunk))
    out["adamw_s"] = statistics.median(times)
    distributed.shutdown()
    Path(spec["out_dir"], RESULT_FILE.format(rank=out["rank"])).write_text(json.dumps(out))


def run_comm_probe(args, facts: dict, processes: int, work: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="comm-", dir=work))
    threads = max(1, args.cores // processes)
    spec = {"elements": facts["parameters"], "threads": threads, "repeats": 3, "out_dir": str(run_dir)}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "bench.sharding", "--worker-comm", str(run_dir / "spec.json")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(report.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    load = [round(x, 2) for x in os.getloadavg()]
    try:
        done = subprocess.run(command, cwd=report.REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:.0f} s"}
    ranks = [json.loads(f.read_text()) for f in sorted(run_dir.glob("rank*.json"))]
    shutil.rmtree(run_dir, ignore_errors=True)
    if done.returncode != 0 or len(ranks) != processes:
        return {"error": f"exit {done.returncode}: {(done.stdout + done.stderr)[-3000:]}"}
    out = {"processes": processes, "threads_per_process": threads, "load_average_start": load,
           "parameter_bytes": 4 * facts["parameters"], "bucket_bytes": ranks[0]["bucket_bytes"]}
    for key in ("all_reduce_s", "all_gather_s", "reduce_scatter_s", "adamw_s"):
        out[key] = max(r[key] for r in ranks)
    return out


def explain(facts: dict, probe: dict, rows: list[dict]) -> list[dict]:
    """What the probe's times predict for one step of each 2-process configuration, beside what was
    measured: the collectives each configuration runs per step and its AdamW share.

    ddp: one all-reduce of the trained parameters' gradients (LoRA: a few MB, counted as 0); every
    process steps AdamW over all trained parameters. fsdp: an all-gather of every weight in the forward,
    again in the backward for the decoder layers (the root group stays gathered), one reduce-scatter of
    the gradients (LoRA: negligible); AdamW over 1/processes of the trained parameters."""
    params, root = facts["parameters"], facts["root_parameters"]
    gather_again = (params - root) / params  # share of the weights gathered a second time, in the backward
    out = []
    for mode in ("lora", "full"):
        trained = 1.0 if mode == "full" else facts["lora_parameters"] / params
        by = {(r["processes"], r["sharding"]): r for r in rows if r["mode"] == mode and not r.get("error")
              and not r.get("skipped")}
        ddp, fsdp = by.get((probe["processes"], "none")), by.get((probe["processes"], "fsdp"))
        if not (ddp and fsdp):
            continue
        ddp_comm = probe["all_reduce_s"] * trained
        fsdp_comm = probe["all_gather_s"] * (1 + gather_again) + probe["reduce_scatter_s"] * trained
        adam_saved = probe["adamw_s"] * trained * (1 - 1 / probe["processes"])
        out.append({"mode": mode, "ddp_comm_s": ddp_comm, "fsdp_comm_s": fsdp_comm, "adamw_saved_s": adam_saved,
                    "predicted_extra_s": fsdp_comm - ddp_comm - adam_saved,
                    "measured_extra_s": fsdp["step_s"] - ddp["step_s"]})
    return out


# --------------------------------------------------------------------------- the driver


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.sharding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=f"smollm2,{RANDOM_MODEL}",
                        help=f"comma-separated: 'smollm2', {RANDOM_MODEL!r} (built once, random, seed 0) or HF folders")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {MODES} (default lora,full)")
    parser.add_argument("--processes", default=None, help="comma-separated process counts (default 1,2)")
    parser.add_argument("--shardings", default=",".join(SHARDINGS), help=f"subset of {SHARDINGS} for >1 process")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step, all processes (default 4)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="CPU cores to share out: each process gets cores / processes torch threads")
    parser.add_argument("--quick", action="store_true",
                        help=f"small defaults for a smoke test: {QUICK} (explicit options still win)")
    parser.add_argument("--memory-margin", type=float, default=0.9,
                        help="skip a configuration whose estimated resident set, all processes, exceeds "
                             "this share of MemAvailable")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--out", default=str(common.RESULTS_DIR))
    parser.add_argument("--memory-table", action="store_true",
                        help="print docs/distributed.md's computed GPU memory table (7B and 70B Llama-style) and exit")
    parser.add_argument("--probe", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the collectives and AdamW alone at each model's size (default: on, "
                             "off with --quick), to say where the step times go")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-comm", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--build-random", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.worker_comm or args.build_random or args.memory_table:
        return args
    if args.probe is None:
        args.probe = not args.quick
    defaults = QUICK if args.quick else DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modes = _subset(args.modes, MODES, "--modes", parser)
    args.shardings = _subset(args.shardings, SHARDINGS, "--shardings", parser)
    try:
        args.processes = sorted({int(p) for p in args.processes.split(",") if p.strip()})
    except ValueError:
        parser.error(f"--processes: expected comma-separated integers, got {args.processes!r}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in ("steps", "warmup", "seq_len", "batch", "cores"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if not args.processes or min(args.processes) < 1:
        parser.error("--processes: expected positive integers")
    if args.seq_len < 8:
        parser.error("--seq-len: expected at least 8 (a quarter of it is the prompt)")
    if any(args.batch % p for p in args.processes):
        parser.error(f"--batch {args.batch}: must divide evenly over every process count {args.processes}, "
                     "so that every configuration does the same work")
    return args


def _subset(text: str, allowed: tuple[str, ...], flag: str, parser) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or any(item not in allowed for item in items):
        parser.error(f"{flag}: expected a comma-separated subset of {allowed}, got {text!r}")
    return items


def configurations(args) -> list[tuple[int, str]]:
    """(processes, sharding): one process runs ``none`` only (fsdp there = none)."""
    out = []
    for processes in args.processes:
        for sharding in (["none"] if processes == 1 else args.shardings):
            out.append((processes, sharding))
    return out


def estimate_bytes(facts: dict, mode: str, processes: int, sharding: str, args) -> int:
    """A process's expected resident set: weights (fp32) + gradients and two AdamW moments of the
    trainable ones (/ processes under fsdp) + activations + 0.75 GiB of runtime (torch, transformers,
    tokenizer, gloo buffers). Activations saved for the backward, per token and layer, in fp32 values:
    ~8 x hidden (norm inputs and outputs, q, attention output, o_proj and MLP inputs, residuals) +
    4 x intermediate (gate, up, SiLU, their product); the lm_head's logits are never materialised (the
    fused head). An estimate to skip what cannot fit; the measured RSS is in the results beside it."""
    cfg = facts["config"]
    trainable = facts["parameters"] if mode == "full" else facts["lora_parameters"]
    state = 4 * facts["parameters"] + 12 * trainable
    if sharding == "fsdp" and processes > 1:
        state //= processes
    tokens = args.batch // processes * args.seq_len
    per_token_layer = 8 * cfg["hidden_size"] + 4 * cfg["intermediate_size"]
    activations = 4 * per_token_layer * tokens * cfg["num_hidden_layers"]
    return state + activations + 3 * common.GIB // 4


def run_configuration(args, model_path: Path, mode: str, processes: int, sharding: str, data: Path,
                      work: Path) -> dict:
    threads = max(1, args.cores // processes)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{mode}-{processes}-{sharding}-", dir=work))
    spec = {"model": str(model_path), "mode": mode, "sharding": sharding, "seq_len": args.seq_len,
            "batch": args.batch, "warmup": args.warmup, "steps": args.steps, "threads": threads,
            "data": str(data), "output_dir": str(run_dir / "out"), "out_dir": str(run_dir)}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    worker_args = ["-m", "bench.sharding", "--worker", str(run_dir / "spec.json")]
    if processes == 1:
        command = [sys.executable, *worker_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), *worker_args]
    # THP_MEM_ALLOC_ENABLE=1 as the `pyalign` command sets it (2 MiB pages for big tensors).
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(report.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    row = {"processes": processes, "sharding": sharding, "mode": mode, "threads_per_process": threads,
           "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=report.REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        shutil.rmtree(run_dir, ignore_errors=True)
        return {**row, "error": f"timed out after {args.timeout:.0f} s"}
    row["wall_s"] = time.perf_counter() - start
    ranks = []
    for rank in range(processes):
        file = run_dir / RESULT_FILE.format(rank=rank)
        if file.is_file():
            ranks.append(json.loads(file.read_text()))
    shutil.rmtree(run_dir, ignore_errors=True)
    if done.returncode != 0 or len(ranks) != processes:
        return {**row, "error": f"exit {done.returncode}: {(done.stdout + done.stderr)[-3000:]}"}
    return {**row, **summarize_ranks(ranks, args)}


def summarize_ranks(ranks: list[dict], args) -> dict:
    """One row from every process's record: the slowest process per step, the largest per-process
    memory (the processes of one configuration hold nearly the same)."""
    timed = slice(args.warmup, args.warmup + args.steps)
    slowest = [max(step) for step in zip(*(r["step_s"] for r in ranks))][timed]
    walls = [max(step) for step in zip(*(r["step_wall_s"] for r in ranks))][timed]
    row = {"step_s": statistics.median(slowest), "step_min_s": min(slowest), "step_times_s": slowest,
           "step_wall_s": statistics.median(walls), "losses": ranks[0]["loss"],
           "seq_widths": sorted({w for r in ranks for w in r["seq_widths"]}),
           "trained_tokens_per_step": ranks[0]["trained_tokens_per_step"],
           "threads_seen": sorted({r["threads"] for r in ranks}), "sharded": ranks[0]["sharded"],
           "per_rank": [{k: r.get(k) for k in ("rank", "state_bytes", "param_bytes", "grad_bytes", "optimizer_bytes",
                                                  "rss_peak_steps_bytes", "rss_peak_life_bytes", "rss_after_warmup_bytes",
                                                  "rss_peak_until_warmup_bytes")}
                        for r in ranks]}
    for key in ("state_bytes", "param_bytes", "trainable_param_bytes", "grad_bytes", "optimizer_bytes",
                "rss_peak_steps_bytes", "rss_peak_life_bytes"):
        values = [r.get(key) for r in ranks if r.get(key) is not None]
        row[key] = max(values) if values else None
    if row["seq_widths"] != [args.seq_len]:
        row["note"] = f"sequence widths {row['seq_widths']}, not {args.seq_len}"
    return row


def derive(rows: list[dict]) -> None:
    """Ratios against the 2-process ddp row of the same model and mode (``x ddp``)."""
    by_key = {(r["model"], r["mode"], r["processes"], r["sharding"]): r for r in rows if not r.get("error")}
    for row in rows:
        for key in list(row):
            if key.endswith("_bytes") and isinstance(row[key], int):
                row[key.replace("_bytes", "_gib")] = row[key] / common.GIB
        if row.get("error"):
            continue
        ddp = by_key.get((row["model"], row["mode"], row["processes"], "none"))
        if ddp is not None and ddp is not row:
            row["step_vs_ddp"] = row["step_s"] / ddp["step_s"]
            row["state_vs_ddp"] = row["state_bytes"] / ddp["state_bytes"]
            if row.get("rss_peak_steps_bytes") and ddp.get("rss_peak_steps_bytes"):
                row["rss_vs_ddp"] = row["rss_peak_steps_bytes"] / ddp["rss_peak_steps_bytes"]
        # Same data, same global batch: every configuration's step losses should be the 1-process run's
        # (to float rounding), which shows they all did the same work.
        one = by_key.get((row["model"], row["mode"], 1, "none"))
        if one is not None and one is not row:
            row["step_vs_1proc"] = row["step_s"] / one["step_s"]
            row["max_loss_diff_vs_1proc"] = max(abs(a - b) for a, b in zip(row["losses"], one["losses"]))


def goals(rows: list[dict]) -> list[dict]:
    """The issue's goal for full fine-tuning with 2+ processes: fsdp state <= 0.6x ddp's, step <= 1.3x."""
    out = []
    for row in rows:
        if row.get("error") or row["mode"] != "full" or row["sharding"] != "fsdp" or "state_vs_ddp" not in row:
            continue
        out.append({"model": row["model"], "processes": row["processes"], "state_vs_ddp": row["state_vs_ddp"],
                    "state_ok": row["state_vs_ddp"] <= 0.6, "step_vs_ddp": row["step_vs_ddp"],
                    "step_ok": row["step_vs_ddp"] <= 1.3})
    return out


COLUMNS = [
    ("model", "model", ""), ("training", "mode_label", ""), ("processes", "processes", ""),
    ("sharding", "sharding_label", ""), ("threads/proc", "threads_per_process", ""),
    ("step s (median)", "step_s", ".2f"), ("step s (min)", "step_min_s", ".2f"), ("x ddp step", "step_vs_ddp", ".2f"),
    ("x 1-process step", "step_vs_1proc", ".2f"),
    ("params GiB/proc", "param_gib", ".3f"), ("grads GiB/proc", "grad_gib", ".3f"),
    ("AdamW GiB/proc", "optimizer_gib", ".3f"), ("state GiB/proc", "state_gib", ".3f"),
    ("x ddp state", "state_vs_ddp", ".2f"), ("peak RSS over steps GiB/proc", "rss_peak_steps_gib", ".2f"),
    ("peak RSS whole run GiB/proc", "rss_peak_life_gib", ".2f"), ("estimate GiB/proc", "estimate_gib", ".2f"),
    ("load at start", "load_label", ""),
    ("note", "note", ""),
]


def render_markdown(payload: dict) -> str:
    env, settings = payload["environment"], payload["settings"]
    rows = []
    for r in payload["rows"]:
        rows.append({**r, "mode_label": "LoRA r8 q/k/v/o" if r["mode"] == "lora" else "full",
                     "sharding_label": "ddp (none)" if r["sharding"] == "none" else "fsdp",
                     "load_label": "/".join(f"{x:.2f}" for x in r.get("load_average_start") or []),
                     "note": r.get("error") or r.get("note") or r.get("skipped")})
    lines = [
        f"# ddp vs fsdp, 1 and 2 processes, LoRA and full fine-tuning ({env['device']})", "",
        report.versions_line(env, "transformers", "peft"),
        (f"`{env['command']}`; load average at start {settings['load_average_start']}; total wall time "
         f"{payload.get('total_wall_s', 0):.0f} s"), "",
        (f"pyalign's SFT run (`task: sft`, the trainer of `pyalign train`), fp32, {settings['batch']} sequences of "
        f"exactly {settings['seq_len']} tokens per optimizer step over all processes (a quarter prompt), AdamW, "
        f"gradient clipping 1.0; {settings['cores']} cores shared out: 1 process x {settings['cores']} threads, "
        f"2 processes x {max(1, settings['cores'] // 2)} thread(s), gloo. Step time: the trainer's `step_s`, the "
        f"slowest process's, median of {settings['steps']} steps after {settings['warmup']} warm-up step(s). "
        "State: the local tensors one process holds after a step (parameters trainable and frozen, gradients, "
        "AdamW's two moments; FSDP: the local shards). Peak RSS over steps: the resident-set high-water mark "
        "from the end of the warm-up step to the last timed step; whole run: the high-water mark of the whole "
        "process (model loading included). GiB/proc: the largest of the processes. `x ddp`: against ddp with the same processes; `x 1-process`: "
        "against the 1-process run of the same model and training. Estimate: what the memory check expected "
        "(bench.sharding.estimate_bytes). "
        "1 process runs `sharding: none` only (fsdp in one process shards nothing and trains as none)."), "",
    ]
    for name, facts in payload["models"].items():
        cfg = facts["config"]
        lines.append(f"- `{name}`: {facts['parameters']:,} parameters ({facts['lora_parameters']:,} LoRA), "
                     f"hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']}, {cfg['num_hidden_layers']} layers, "
                     f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} kv heads of "
                     f"{cfg['head_dim']}, vocabulary {cfg['vocab_size']}, tied embeddings "
                     f"{cfg['tie_word_embeddings']}{'; ' + facts['origin'] if facts.get('origin') else ''}")
    lines += ["", report.markdown_table(rows, COLUMNS), ""]
    for goal in payload["goals"]:
        lines.append(f"- goal, {goal['model']} full fine-tuning, {goal['processes']} processes: fsdp state "
                     f"{goal['state_vs_ddp']:.2f}x ddp's ({'met' if goal['state_ok'] else 'NOT met'}, <= 0.6), "
                     f"step time {goal['step_vs_ddp']:.2f}x ({'met' if goal['step_ok'] else 'NOT met'}, <= 1.3)")
    lines += explanation_lines(payload)
    diffs = [r["max_loss_diff_vs_1proc"] for r in payload["rows"] if r.get("max_loss_diff_vs_1proc") is not None]
    if diffs:
        lines.append(f"- same work: every step loss of the 2-process runs equals the 1-process run's of the same "
                     f"model and training to {max(diffs):.1e} (same examples, same global batch)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- computed GPU memory (docs/distributed.md)

# Llama-style sizes of the two models in docs/distributed.md's table (Llama-2-7B and Llama-2-70B's shapes).
LLAMA_SIZES = {
    "7B": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False},
    "70B": {"vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8, "tie_word_embeddings": False},
}
GPUS_PER_NODE = 8


def llama_counts(sizes: dict) -> dict:
    """Parameter counts of a Llama-style model built on the meta device (nothing allocated): all,
    one decoder layer, the root group (embeddings, final norm, lm_head) and LoRA r 8 on q/k/v/o."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**sizes))
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    lora = sum(LORA["r"] * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LORA["target_modules"])
    return {"parameters": total, "layer": layer, "root": total - layer * sizes["num_hidden_layers"], "lora": lora}


def memory_rows() -> list[dict]:
    """Weights + gradients + AdamW state per GPU, computed from parameter counts (no activations).

    Bytes per parameter: frozen weights 2 (bf16); trained weights, their gradients and AdamW's two
    moments in the parameters' dtype: bf16 2 + 2 + 4 = 8, or fp32 master weights (model.dtype float32,
    bf16 compute by autocast / FSDP2's MixedPrecisionPolicy) 4 + 4 + 8 = 16. LoRA weights are fp32
    (peft keeps adapters of a bf16 model in fp32): 16. ddp: all of it on every GPU; fsdp over N GPUs:
    1/N of it, plus the working set of unsharded bf16 weights (the root group, kept from forward to
    backward, and two decoder layers: the one computing and the one prefetched). cpu_offload: the
    sharded state lives in CPU memory (per node: 8 GPUs' shares), the GPU holds the working set."""
    rows = []
    for name, sizes in LLAMA_SIZES.items():
        counts = llama_counts(sizes)
        params = counts["parameters"]
        working = 2 * (counts["root"] + 2 * counts["layer"])
        setups = [("LoRA r8 q/k/v/o", 2 * params + 16 * counts["lora"]),
                  ("full, bf16 weights", 8 * params), ("full, fp32 master weights", 16 * params)]
        for training, state in setups:
            strategies = [("ddp", 1, False)] + [("fsdp", n, offload) for n in (8, 16) for offload in (False, True)]
            for strategy, gpus, offload in strategies:
                shard = state if strategy == "ddp" else state / gpus
                rows.append({
                    "model": name, "parameters": params, "training": training,
                    "strategy": strategy if strategy == "ddp" else f"fsdp / {gpus} GPUs",
                    "cpu_offload": offload,
                    "gpu_state_gib": 0.0 if offload else shard / common.GIB,
                    "gpu_working_gib": 0.0 if strategy == "ddp" else working / common.GIB,
                    "cpu_per_node_gib": shard * min(gpus, GPUS_PER_NODE) / common.GIB if offload else None,
                })
    return rows


def render_memory_table() -> str:
    """One row per model and training, one column per strategy; a cell is GiB per GPU:
    sharded state + unsharded working set = total, and with cpu_offload the CPU memory per node."""
    rows = memory_rows()
    columns = []
    for row in rows:
        key = (row["strategy"], row["cpu_offload"])
        if key not in columns:
            columns.append(key)
    lines = ["| model | training | " + " | ".join(f"{s}{' + cpu_offload' if o else ''}" for s, o in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for model in LLAMA_SIZES:
        for training in dict.fromkeys(r["training"] for r in rows):
            cells = []
            for strategy, offload in columns:
                row = next(r for r in rows if r["model"] == model and r["training"] == training
                           and r["strategy"] == strategy and r["cpu_offload"] == offload)
                total = row["gpu_state_gib"] + row["gpu_working_gib"]
                if offload:
                    cells.append(f"{total:.1f} (CPU {row['cpu_per_node_gib']:.0f} per node)")
                elif row["gpu_working_gib"]:
                    cells.append(f"{row['gpu_state_gib']:.1f} + {row['gpu_working_gib']:.1f} = {total:.1f}")
                else:
                    cells.append(f"{total:.1f}")
            params = rows[[r["model"] for r in rows].index(model)]["parameters"]
            lines.append(f"| {model} ({params / 1e9:.2f}B) | {training} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def explanation_lines(payload: dict) -> list[str]:
    lines = []
    for name, facts in payload["models"].items():
        probe = facts.get("probe")
        if not probe:
            continue
        if probe.get("error"):
            lines.append(f"- {name}: the probe failed: {probe['error'][-300:]}")
            continue
        lines.append(
            f"- where the time goes, {name} ({probe['parameter_bytes'] / common.GIB:.2f} GiB of fp32 weights; "
            f"{probe['processes']} processes x {probe['threads_per_process']} thread, gloo, {probe['bucket_bytes'] >> 20} MiB "
            f"buckets, load at start {'/'.join(f'{x:.2f}' for x in probe['load_average_start'])}): all-reduce of all "
            f"of it {probe['all_reduce_s']:.2f} s, all-gather {probe['all_gather_s']:.2f} s, reduce-scatter "
            f"{probe['reduce_scatter_s']:.2f} s, AdamW over that many parameters {probe['adamw_s']:.2f} s per process.")
        for e in facts.get("explained", []):
            lines.append(
                f"  - {'LoRA' if e['mode'] == 'lora' else 'full'}: collectives per step ddp {e['ddp_comm_s']:.2f} s, "
                f"fsdp {e['fsdp_comm_s']:.2f} s; fsdp's smaller AdamW share saves {e['adamw_saved_s']:.2f} s; "
                f"predicted fsdp - ddp {e['predicted_extra_s']:+.2f} s per step, measured {e['measured_extra_s']:+.2f} s")
    return lines


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.memory_table:
        print(render_memory_table())
        return None
    if args.build_random:
        build_random_model(Path(args.build_random))
        return None
    if args.worker:
        worker(args.worker)
        return None
    if args.worker_comm:
        comm_worker(args.worker_comm)
        return None
    started = time.perf_counter()
    common.set_threads(args.cores)  # the driver computes nothing; its thread count names the result file
    env = report.environment(torch.device("cpu"), "bench.sharding", argv)
    for name in ("transformers", "peft", "accelerate"):
        env[name] = report.package_version(name)
    settings = {"models": args.models, "modes": args.modes, "configurations": configurations(args),
                "steps": args.steps, "warmup": args.warmup, "seq_len": args.seq_len, "batch": args.batch,
                "cores": args.cores, "lora": LORA, "lr": LR, "dtype": "float32", "quick": args.quick,
                "load_average_start": [round(x, 2) for x in os.getloadavg()],
                "mem_available_start_bytes": common.free_memory_bytes(torch.device("cpu"))}
    rows: list[dict] = []
    payload = {"environment": env, "settings": settings, "models": {}, "rows": rows, "goals": []}
    stem = report.result_stem("sharding", torch.device("cpu"), env["timestamp_utc"])
    paths: list[Path] = []

    def save() -> None:  # after every configuration: a run cut off keeps what it finished
        derive(rows)
        payload["goals"] = goals(rows)
        payload["total_wall_s"] = time.perf_counter() - started
        paths[:] = report.write_outputs(Path(args.out), stem, payload, render_markdown(payload), None)

    with tempfile.TemporaryDirectory(prefix="bench-sharding-") as tmp:
        work = Path(tmp)
        data = work / "sft.jsonl"
        write_sft_data(data, args.batch * (args.warmup + args.steps), args.seq_len, seed=0)
        for name in args.models:
            path = resolve_model(name)
            label = name if name in ("smollm2", RANDOM_MODEL) else path.name
            facts = model_facts(path)
            if name == RANDOM_MODEL:
                facts["origin"] = f"random init (seed 0), SmolLM2-135M's config with {RANDOM_MODEL_SIZES}"
            payload["models"][label] = facts
            for mode in args.modes:
                for processes, sharding in configurations(args):
                    estimate = estimate_bytes(facts, mode, processes, sharding, args)
                    available = common.free_memory_bytes(torch.device("cpu"))
                    head = {"model": label, "mode": mode, "processes": processes, "sharding": sharding,
                            "estimate_bytes": estimate, "mem_available_bytes": available}
                    if processes * estimate > args.memory_margin * available:
                        rows.append({**head, "skipped": f"estimated {processes} x {estimate / common.GIB:.1f} GiB > "
                                     f"{args.memory_margin:.0%} of {available / common.GIB:.1f} GiB available"})
                    else:
                        print(f"[bench.sharding] {label} {mode} {processes} process(es) {sharding} ...",
                              file=sys.stderr, flush=True)
                        result = run_configuration(args, path, mode, processes, sharding, data, work)
                        rows.append({**head, **result})
                        summary = result.get("error") or (f"step {result['step_s']:.2f} s, state "
                                                          f"{result['state_bytes'] / common.GIB:.3f} GiB")
                        print(f"[bench.sharding]   {summary}", file=sys.stderr, flush=True)
                    save()
            if args.probe and max(args.processes) > 1:
                print(f"[bench.sharding] {label}: collectives and AdamW alone ...", file=sys.stderr, flush=True)
                facts["probe"] = run_comm_probe(args, facts, max(args.processes), work)
                if not facts["probe"].get("error"):
                    facts["explained"] = explain(facts, facts["probe"], [r for r in rows if r["model"] == label])
                save()
    print(render_markdown(payload))
    print("\n".join(f"wrote {p}" for p in paths), file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
