"""``python -m bench.trl``: TRL's DPOTrainer vs the pyalign drop-in vs pyalign's own trainer.

One command, same model (SmolLM2-135M-Instruct), data, LoRA and seed for every method; each
(method, length) runs in a fresh subprocess so that resident-set high-water marks do not mix.

- ``trl``: ``trl.DPOTrainer`` as shipped (its chunked lm_head; on the CPU a torch tile loop).
- ``pyalign_trl``: ``pyalign.integrations.trl.DPOTrainer``, same ``DPOConfig``.
- ``pyalign``: pyalign's own trainer (``pyalign.train``), whose reference log-probs are computed
  once before training (reported as ``setup``), so its steps have no reference forward.
- ``body``: the bound: the same LoRA model's decoder alone (reference forward without gradient,
  policy forward + backward, optimizer step) with a loss on the last hidden states that costs
  nothing: what any method spends outside the lm_head.

Per row: median step time over the steps after ``--warmup`` (time between the ends of consecutive
optimizer steps), the resident-set high-water mark over those steps (``/proc/self/clear_refs`` +
``VmHWM``), and the peak of torch's CPU allocations during one more step (profiler allocation
events, running sum from the step's start). Results: bench/results/trl_<device>_<time>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import common, report

METHODS = ("trl", "pyalign_trl", "pyalign", "body")
LABELS = {"trl": "TRL DPOTrainer (as shipped)", "pyalign_trl": "pyalign drop-in (pyalign.integrations.trl)",
          "pyalign": "pyalign trainer (pyalign.train)", "body": "decoder alone (bound)"}
LORA = {"r": 8, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
BETA = 0.1
LR = 1e-5
WORDS = ("the of and to in is for on that with as by at from this be are was it an or which have not has but "
         "were he can his their they we will all more one also its had been new would other than may some these "
         "about into first only time after such most two when there any between made over").split()
RESULT_MARK = "BENCH_TRL_RESULT "


# --------------------------------------------------------------------------- data


def preference_rows(pairs: int, tokens: int, seed: int) -> list[dict]:
    """``pairs`` prompt/chosen/rejected texts of common one-token words: the prompt about a quarter
    of ``tokens`` (chat template included), the responses longer than the rest, so that every
    sequence is cut to exactly ``tokens`` tokens by ``max_length``."""
    rng = random.Random(seed)
    prompt_words = max(8, tokens // 4 - 32)  # SmolLM2's template adds ~32 tokens around the prompt

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    return [{"prompt": text(prompt_words), "chosen": text(tokens), "rejected": text(tokens)} for _ in range(pairs)]


# --------------------------------------------------------------------------- measurement


class StepProbe:
    """Step ends -> step times; resident-set peak over the timed steps; torch's allocation peak
    over one profiled step after them."""

    def __init__(self, warmup: int, steps: int, profile_ops: bool):
        self.warmup, self.steps, self.profile_ops = warmup, steps, profile_ops
        self.ends: list[float] = []
        self.rss_start = self.rss_peak = None
        self.torch_peak = None
        self.top_ops = None
        self._profiler = None

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + 1

    def start(self) -> None:
        self.ends = [time.perf_counter()]

    def step_end(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based)."""
        self.ends.append(time.perf_counter())
        if step == self.warmup:
            self.rss_start = _reset_rss_peak()
        elif step == self.warmup + self.steps:
            self.rss_peak = common._proc_status_bytes("VmHWM")
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                    profile_memory=True)
            self._profiler.__enter__()
        elif step == self.total_steps and self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self.torch_peak = _allocation_peak(self._profiler)
            if self.profile_ops:
                table = self._profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
                self.top_ops = table
            self._profiler = None

    def result(self) -> dict:
        durations = [b - a for a, b in zip(self.ends, self.ends[1:])]
        timed = durations[self.warmup:self.warmup + self.steps]
        summary = common.summarize([t * 1e3 for t in timed]) if timed else {}
        return {
            "step_s": summary["median_ms"] / 1e3 if timed else None,
            "step_min_s": summary["min_ms"] / 1e3 if timed else None,
            "step_times_s": durations,
            "rss_before_steps_bytes": self.rss_start,
            "rss_peak_bytes": self.rss_peak,
            "torch_step_peak_bytes": self.torch_peak,
            "top_ops": self.top_ops,
        }


def _reset_rss_peak() -> int | None:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return None
    return common._proc_status_bytes("VmRSS")


def _allocation_peak(profiler) -> int:
    events = [(e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
              if e.name() == "[memory]" and common._is_cpu_event(e)]
    running = peak = 0
    for _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return peak


# --------------------------------------------------------------------------- methods (in the worker)


def _load_model(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def run_trl(args, probe: StepProbe, drop_in: bool) -> dict:
    import trl  # noqa: PLC0415
    from datasets import Dataset  # noqa: PLC0415
    from peft import LoraConfig  # noqa: PLC0415
    from transformers import AutoTokenizer, TrainerCallback  # noqa: PLC0415

    from pyalign.models import smollm2_path  # noqa: PLC0415

    if drop_in:
        from pyalign.integrations.trl import DPOTrainer  # noqa: PLC0415
    else:
        DPOTrainer = trl.DPOTrainer  # noqa: N806
    path = Path(args.model or smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = preference_rows(args.pairs * probe.total_steps, args.tokens, args.seed)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])

    class Probe(TrainerCallback):
        def on_train_begin(self, *_, **__):
            probe.start()

        def on_step_end(self, _args, state, *_, **__):
            probe.step_end(state.global_step)

    config = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), use_cpu=True, bf16=args.dtype == "bf16",
        per_device_train_batch_size=args.pairs, max_length=args.tokens, max_steps=probe.total_steps,
        learning_rate=LR, beta=BETA, gradient_checkpointing=args.gradient_checkpointing, logging_steps=1,
        report_to=[], save_strategy="no", seed=args.seed, disable_tqdm=True, dataloader_num_workers=0,
        precompute_ref_log_probs=args.precompute_ref)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"], lora_dropout=0.0)
    setup_start = time.perf_counter()
    trainer = DPOTrainer(model=_load_model(path, torch.float32), args=config, train_dataset=data,
                         processing_class=tokenizer, peft_config=lora, callbacks=[Probe()])
    setup_s = time.perf_counter() - setup_start
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.pairs)])
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    out = {"setup_s": setup_s, "losses": losses, "seq_len": int(batch["input_ids"].shape[1]),
           "completion_tokens": int(batch["completion_mask"][:, 1:].sum())}
    if drop_in:
        out["routes"] = sorted({route for _, route, _ in trainer.pyalign_routes})
    return out


def run_pyalign(args, probe: StepProbe) -> dict:
    from pyalign.models import smollm2_path  # noqa: PLC0415
    from pyalign.tasks.preference import run_sequential  # noqa: PLC0415

    path = Path(args.model or smollm2_path())
    work = Path(tempfile.mkdtemp(prefix="bench-pyalign-"))
    rows = preference_rows(args.pairs * probe.total_steps, args.tokens, args.seed)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"path": str(path), "dtype": "float32"},
        "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": 0.0, "target_modules": LORA["target_modules"]},
        "method": {"loss": "dpo", "beta": BETA},
        "rounds": [{"name": "bench", "train": str(data)}],
        "training": {"lr": LR, "epochs": 1, "batch_size": args.pairs, "grad_accum": 1, "max_length": args.tokens,
                     "max_prompt_length": args.tokens // 2, "seed": args.seed, "device": "cpu",
                     "mixed_precision": "bf16" if args.dtype == "bf16" else "no",
                     "gradient_checkpointing": args.gradient_checkpointing, "save_every": 0, "log_every": 1,
                     "progress_bar": False, "tensorboard": False},
        "output_dir": str(work / "out"),
    }
    events = {}

    def callback(event, info):
        events.setdefault(event, time.perf_counter())
        if event == "step":
            probe.step_end(info["step"])

    start = time.perf_counter()
    probe.start()  # step 1 (untimed) also counts the setup before it
    run_sequential(config, callback=callback)
    frozen = events.get("logprobs_computed")
    return {"setup_s": None if frozen is None else frozen - start}


def run_body(args, probe: StepProbe) -> dict:
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    from pyalign.models import fused_head as hf  # noqa: PLC0415
    from pyalign.models import smollm2_path  # noqa: PLC0415

    path = Path(args.model or smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = _load_model(path, torch.float32)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"], lora_dropout=0.0)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, lora)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    decoder = hf.fused_head_or_reason(model)[0].decoder
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    gen = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, len(tokenizer), (2 * args.pairs, args.tokens), generator=gen)
    probe_vector = torch.randn(model.config.hidden_size, generator=gen)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    reference_s = []
    probe.start()
    for step in range(1, probe.total_steps + 1):
        with autocast:
            start = time.perf_counter()
            with torch.no_grad(), model.disable_adapter():
                decoder(input_ids=input_ids, use_cache=False)
            reference_s.append(time.perf_counter() - start)
            hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            loss = (hidden.float() @ probe_vector).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        probe.step_end(step)
    timed = reference_s[probe.warmup:probe.warmup + probe.steps]
    return {"seq_len": args.tokens, "reference_forward_s": common.summarize([t * 1e3 for t in timed])["median_ms"] / 1e3}


def worker(args) -> None:
    common.set_threads(args.threads)
    probe = StepProbe(args.warmup, args.steps, args.profile_ops)
    if args.method in ("trl", "pyalign_trl"):
        extra = run_trl(args, probe, drop_in=args.method == "pyalign_trl")
    elif args.method == "pyalign":
        extra = run_pyalign(args, probe)
    else:
        extra = run_body(args, probe)
    result = {"method": args.method, "tokens": args.tokens, "pairs": args.pairs, **probe.result(), **extra,
              "process_rss_peak_bytes": None}
    try:
        result["process_rss_peak_bytes"] = common._proc_status_bytes("VmHWM")
    except OSError:
        pass
    print(RESULT_MARK + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the lm_head alone (--head-profile)


def head_methods(tokens: int, dtype: torch.dtype, seed: int) -> dict:
    """The log-prob head of one DPO step of 2 pairs at SmolLM2's sizes (H 576, V 49152), frozen
    weight (LoRA), forward + backward to the hidden states, statistics included, as each route runs it
    on the CPU: TRL's chunked function (every position, autocast), pyalign's fused op (completion
    tokens), and pyalign's fused op with a float32 head."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: PLC0415

    from pyalign.ops.linear_token_logprobs import linear_token_logprobs  # noqa: PLC0415

    hidden_size, vocab, rows = 576, 49152, 4 * tokens
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * 0.1
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels_masked = labels.clone().view(4, tokens)
    labels_masked[:, : tokens // 4] = -100
    labels_masked = labels_masked.view(-1)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")

    def trl_head():
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logp = ChunkedLogProbFunction.apply(h, weight, None, labels, 1.0, 32768, None, 1.0, outputs)[0]
        (logp * (labels_masked != -100)).sum().backward()
        return h.grad

    def pyalign_head(head_dtype):
        def run():
            h = hidden.to(head_dtype).requires_grad_()
            logp, _ = linear_token_logprobs(h, weight.to(head_dtype), labels_masked, return_stats=True)
            logp.sum().backward()
            return h.grad
        return run

    methods = {"trl chunked (autocast)": trl_head, "pyalign fused": pyalign_head(dtype)}
    if dtype != torch.float32:
        methods["pyalign fused, fp32 head"] = pyalign_head(torch.float32)
    return methods


def head_matmul_rates(rows: int = 64) -> list[dict]:
    """GFLOP/s of the lm_head's three products at SmolLM2's sizes, float32 vs bfloat16 (one call
    each after one warm-up call: a CPU without native bf16 runs some of them at < 1 GFLOP/s)."""
    hidden_size, vocab = 576, 49152
    out = []
    for dtype_name in ("fp32", "bf16"):
        dtype = common.DTYPES[dtype_name]
        h = torch.randn(rows, hidden_size).to(dtype)
        w = torch.randn(vocab, hidden_size).to(dtype)
        d = torch.randn(rows, vocab).to(dtype)
        row = {"dtype": dtype_name}
        for name, run in (("logits = hidden @ weight.T", lambda: h @ w.t()),
                          ("grad_hidden = d_logits @ weight", lambda: d @ w),
                          ("grad_weight = d_logits.T @ hidden", lambda: d.t() @ h)):
            run()
            start = time.perf_counter()
            run()
            row[name] = 2 * rows * hidden_size * vocab / (time.perf_counter() - start) / 1e9
        out.append(row)
    return out


def head_profile(args) -> dict:
    rows = []
    for dtype_name in ("fp32", "bf16"):
        dtype = common.DTYPES[dtype_name]
        for name, run in head_methods(args.tokens_list[0], dtype, args.seed).items():
            stats = common.time_calls(run, lambda: None, torch.device("cpu"), warmup=1, repeats=args.steps)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                run()
            total = sum(e.self_cpu_time_total for e in prof.key_averages())
            top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
            rows.append({"dtype": dtype_name, "method": name, "median_s": stats["median_ms"] / 1e3,
                         "top_ops": "; ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in top)})
            print(f"[bench.trl] head {dtype_name} {name}: {stats['median_ms'] / 1e3:.2f} s", file=sys.stderr, flush=True)
    return {"rows": rows, "matmul_gflops": head_matmul_rates()}


def render_head_markdown(payload: dict) -> str:
    env, settings = payload["environment"], payload["settings"]
    return "\n".join([
        f"# The log-prob head alone, fp32 vs bf16 ({env['device']})", "",
        report.versions_line(env, "trl"),
        f"`{env['command']}`; ONEDNN_MAX_CPU_ISA={settings['onednn_max_cpu_isa']}, oneDNN bf16 matmul: "
        f"{settings['mkldnn_bf16']}; load average at start {settings['load_average_start']}", "",
        f"2 pairs x {settings['tokens']} tokens (4 x {settings['tokens']} positions, the first quarter "
        "prompt), H=576, V=49152 (SmolLM2-135M), frozen lm_head (LoRA); forward + backward to the hidden "
        f"states with the statistics TRL logs; median of {settings['steps']} calls; top operators by "
        "self CPU time in one more call.", "",
        report.markdown_table(payload["rows"], [("dtype", "dtype", ""), ("method", "method", ""),
                                                ("s (median)", "median_s", ".3f"), ("top operators", "top_ops", "")]),
        "", "The lm_head's products alone (64 rows, GFLOP/s):", "",
        report.markdown_table(payload["matmul_gflops"], [("dtype", "dtype", "")] + [
            (name, name, ".1f") for name in payload["matmul_gflops"][0] if name != "dtype"]),
    ])


# --------------------------------------------------------------------------- driver


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.trl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--tokens", default="256,1024", help="tokens per sequence, comma-separated")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per optimizer step (2 sequences each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 autocast (TRL: DPOConfig(bf16=True); pyalign: bfloat16 weights)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="TRL's default is on")
    parser.add_argument("--precompute-ref", action="store_true",
                        help="DPOConfig(precompute_ref_log_probs=True) for trl and pyalign_trl")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="HF folder (default: pyalign.models.smollm2_path())")
    parser.add_argument("--profile-ops", action="store_true", help="keep the profiled step's top operators")
    parser.add_argument("--head-profile", action="store_true",
                        help="time and profile the log-prob head alone (TRL's chunked function vs pyalign's "
                             "fused op) in fp32 and bf16, in this process")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per (method, length) subprocess")
    parser.add_argument("--out", default=str(common.RESULTS_DIR))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in args.methods:
        if method not in METHODS:
            parser.error(f"--methods: unknown method {method!r}; expected some of {METHODS}")
    try:
        args.tokens_list = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--tokens: expected comma-separated integers, got {args.tokens!r}")
    if not args.tokens_list or min(args.tokens_list) < 64:
        parser.error("--tokens: each length must be at least 64")
    if args.pairs < 1 or args.warmup < 1 or args.steps < 1:
        parser.error("--pairs, --warmup and --steps must be >= 1")
    return args


def run_one(args, method: str, tokens: int) -> dict:
    argv = [sys.executable, "-m", "bench.trl", "--worker", method, "--methods", method, "--tokens", str(tokens),
            "--pairs", str(args.pairs), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--dtype", args.dtype, "--seed", str(args.seed),
            "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
    for flag, value in (("--threads", args.threads), ("--model", args.model)):
        if value is not None:
            argv += [flag, str(value)]
    if args.precompute_ref:
        argv.append("--precompute-ref")
    if args.profile_ops:
        argv.append("--profile-ops")
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=report.REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "tokens": tokens, "error": f"timed out after {args.timeout:.0f} s"}
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return {**json.loads(line[len(RESULT_MARK):]), "wall_s": wall}
    return {"method": method, "tokens": tokens, "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}


def derived(rows: list[dict]) -> list[dict]:
    """Ratios to TRL's row of the same length, and the body's bound."""
    by_key = {(r["method"], r["tokens"]): r for r in rows if not r.get("error")}
    out = []
    for row in rows:
        row = dict(row)
        trl_row, body = by_key.get(("trl", row["tokens"])), by_key.get(("body", row["tokens"]))
        if trl_row and row.get("step_s"):
            row["speedup_vs_trl"] = trl_row["step_s"] / row["step_s"]
        if trl_row and row.get("rss_peak_bytes") and trl_row.get("rss_peak_bytes"):
            row["rss_vs_trl"] = row["rss_peak_bytes"] / trl_row["rss_peak_bytes"]
        if body and row.get("step_s") and row["method"] != "body":
            row["outside_body_s"] = row["step_s"] - body["step_s"]
        for key in ("rss_peak_bytes", "rss_before_steps_bytes", "torch_step_peak_bytes", "process_rss_peak_bytes"):
            if row.get(key) is not None:
                row[key.replace("_bytes", "_gib")] = row[key] / common.GIB
        row["label"] = LABELS.get(row["method"], row["method"])
        row["load_1min_after"] = (row.get("load_average_after") or [None])[0]
        out.append(row)
    return out


COLUMNS = [
    ("method", "label", ""), ("tokens", "tokens", ""), ("step s (median)", "step_s", ".2f"),
    ("step s (min)", "step_min_s", ".2f"),
    ("x TRL speed", "speedup_vs_trl", ".2f"), ("step - body s", "outside_body_s", ".2f"),
    ("peak RSS GiB", "rss_peak_gib", ".2f"), ("x TRL RSS", "rss_vs_trl", ".2f"),
    ("torch peak / step GiB", "torch_step_peak_gib", ".3f"), ("RSS before steps GiB", "rss_before_steps_gib", ".2f"),
    ("setup s", "setup_s", ".1f"), ("load after", "load_1min_after", ".1f"), ("note", "note", ""),
]


def render_markdown(payload: dict) -> str:
    env = payload["environment"]
    settings = payload["settings"]
    rows = [{**r, "note": r.get("error") or ", ".join(r.get("routes") or [])} for r in payload["rows"]]
    lines = [
        f"# TRL DPOTrainer vs the pyalign drop-in vs pyalign's trainer ({env['device']})", "",
        report.versions_line(env, "trl", "transformers", "peft"),
        f"`{env['command']}`; load average at start {settings['load_average_start']}", "",
        f"{settings['model']}, LoRA r={LORA['r']} alpha={LORA['alpha']} on {', '.join(LORA['target_modules'])}, "
        f"{settings['pairs']} pairs (= {2 * settings['pairs']} sequences) per step, {settings['dtype']}, gradient "
        f"checkpointing {'on' if settings['gradient_checkpointing'] else 'off'}, reference log-probs "
        f"{'precomputed' if settings['precompute_ref'] else 'computed every step'} for TRL and the drop-in "
        "(pyalign's trainer always caches them before training: `setup s`). Step time: median of "
        f"{settings['steps']} steps after {settings['warmup']} warm-up step(s); peak RSS over those steps "
        "(each method in its own process); `load after`: the 1-minute load average when it finished (2 cores: "
        "above ~2 means other processes shared the CPU, and the min is the better estimate); torch peak: highest live CPU tensor allocations during one more "
        "step, above what was live at its start.", "",
        report.markdown_table(rows, COLUMNS), "",
    ]
    lines += bound_lines(payload["rows"])
    return "\n".join(lines)


def bound_lines(rows: list[dict]) -> list[str]:
    lines = []
    by_key = {(r["method"], r["tokens"]): r for r in rows if r.get("step_s")}
    for tokens in sorted({r["tokens"] for r in rows}):
        body, trl_row = by_key.get(("body", tokens)), by_key.get(("trl", tokens))
        if not (body and trl_row):
            continue
        text = (f"- {tokens} tokens: the decoder alone takes {body['step_s']:.2f} s per step, so no lm_head or "
                f"loss code can make TRL's {trl_row['step_s']:.2f} s step more than "
                f"{trl_row['step_s'] / body['step_s']:.2f}x faster; TRL spends {trl_row['step_s'] - body['step_s']:.2f} s "
                "outside the decoder")
        drop_in = by_key.get(("pyalign_trl", tokens))
        if drop_in:
            text += f", the drop-in {drop_in['step_s'] - body['step_s']:.2f} s"
        text += "."
        own = by_key.get(("pyalign", tokens))
        if own and body.get("reference_forward_s") is not None:
            text += (f" Without the reference forward ({body['reference_forward_s']:.2f} s of the decoder's step; "
                     f"pyalign's trainer caches it) the bound is {body['step_s'] - body['reference_forward_s']:.2f} s.")
        lines.append(text)
    return lines


def plot(payload: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [r for r in payload["rows"] if r.get("step_s")]
    lengths = sorted({r["tokens"] for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    width = 0.8 / max(1, len(methods))
    colours = {"trl": "tab:gray", "pyalign_trl": "tab:blue", "pyalign": "tab:cyan", "body": "tab:olive"}
    for ax, key, title in ((axes[0], "step_s", "step time (s, median)"),
                           (axes[1], "rss_peak_bytes", "peak RSS over the steps (GiB)")):
        for i, method in enumerate(methods):
            values = []
            for tokens in lengths:
                row = next((r for r in rows if r["method"] == method and r["tokens"] == tokens), None)
                value = None if row is None else row.get(key)
                values.append(0.0 if value is None else value / (common.GIB if key.endswith("bytes") else 1))
            ax.bar([x + i * width for x in range(len(lengths))], values, width, label=method, color=colours[method])
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(lengths))],
                      [f"{t} tokens" for t in lengths])
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"DPO step, {payload['settings']['model']} + LoRA, {payload['settings']['pairs']} pairs, "
                 f"{payload['settings']['dtype']}, {payload['environment']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        args.method, args.tokens = args.worker, args.tokens_list[0]
        worker(args)
        return None
    common.set_threads(args.threads)
    env = report.environment(torch.device("cpu"), "bench.trl", argv)
    for name in ("trl", "transformers", "peft", "accelerate"):
        env[name] = report.package_version(name)
    if args.head_profile:
        settings = {"tokens": args.tokens_list[0], "steps": args.steps, "seed": args.seed,
                    "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "(unset)"),
                    "mkldnn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    "load_average_start": [round(x, 2) for x in os.getloadavg()]}
        payload = {"environment": env, "settings": settings, **head_profile(args)}
        stem = report.result_stem("trl_head", torch.device("cpu"), env["timestamp_utc"])
        if os.environ.get("ONEDNN_MAX_CPU_ISA"):
            stem += "_onednn-" + os.environ["ONEDNN_MAX_CPU_ISA"].lower()
        paths = report.write_outputs(Path(args.out), stem, payload, render_head_markdown(payload), None)
        print(render_head_markdown(payload))
        print("\n".join(f"wrote {p}" for p in paths), file=sys.stderr)
        return payload
    settings = {"pairs": args.pairs, "tokens": args.tokens_list, "methods": args.methods, "warmup": args.warmup,
                "steps": args.steps, "dtype": args.dtype, "gradient_checkpointing": args.gradient_checkpointing,
                "precompute_ref": args.precompute_ref, "seed": args.seed, "lora": LORA, "beta": BETA, "lr": LR,
                "load_average_start": [round(x, 2) for x in os.getloadavg()],
                "model": Path(args.model).name if args.model else "SmolLM2-135M-Instruct"}
    stem = report.result_stem("trl", torch.device("cpu"), env["timestamp_utc"])
    rows: list[dict] = []
    payload = {"environment": env, "settings": settings, "rows": rows}
    for tokens in args.tokens_list:
        for method in args.methods:
            print(f"[bench.trl] {method} x {tokens} tokens ...", file=sys.stderr, flush=True)
            result = run_one(args, method, tokens)
            result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            rows.append(result)
            summary = result.get("error") or f"step {result.get('step_s') or 0:.2f} s, peak RSS " \
                f"{(result.get('rss_peak_bytes') or 0) / common.GIB:.2f} GiB"
            print(f"[bench.trl]   {summary}", file=sys.stderr, flush=True)
            payload["rows"] = derived(rows)
            paths = report.write_outputs(Path(args.out), stem, payload, render_markdown(payload),
                                         (lambda p: plot(payload, p)) if any(r.get("step_s") for r in rows) else None)
    print(render_markdown(payload))
    print("\n".join(f"wrote {p}" for p in paths), file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
