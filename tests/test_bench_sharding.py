"""Smoke test of ``python -m bench.sharding --quick`` on the tiny random model (2 gloo processes, ddp and
fsdp, full fine-tuning): the files it writes, their structure, that both configurations did the same
work (same losses), and that fsdp holds less parameter + gradient + optimizer state per process."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_tiny_lm import save_tiny_model  # noqa: E402

from bench import sharding  # noqa: E402


def test_quick_mode_writes_rows_and_fsdp_holds_less_state(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    payload = sharding.main(["--quick", "--models", str(model), "--out", str(tmp_path / "out")])

    files = sorted((tmp_path / "out").glob("sharding_*"))
    assert [f.suffix for f in files] == [".json", ".md"], files
    assert json.loads(files[0].read_text())["rows"] == json.loads(json.dumps(payload["rows"], default=str))
    markdown = files[1].read_text()
    assert "| model | training | processes | sharding |" in markdown and "goal, tiny full fine-tuning" in markdown
    assert payload["environment"]["command"].startswith("python -m bench.sharding --quick")
    assert payload["settings"]["configurations"] == [(2, "none"), (2, "fsdp")]
    assert payload["models"]["tiny"]["parameters"] > 0

    rows = {(r["processes"], r["sharding"]): r for r in payload["rows"]}
    assert set(rows) == {(2, "none"), (2, "fsdp")}
    for row in rows.values():
        assert "error" not in row and "skipped" not in row, row
        assert row["mode"] == "full" and row["threads_per_process"] >= 1
        assert row["seq_widths"] == [payload["settings"]["seq_len"]]  # every sequence cut to the same length
        assert row["step_s"] > 0 and len(row["step_times_s"]) == payload["settings"]["steps"]
        assert row["rss_peak_life_bytes"] > 0 and len(row["per_rank"]) == 2
        assert row["state_bytes"] == row["param_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]
    ddp, fsdp = rows[(2, "none")], rows[(2, "fsdp")]
    assert fsdp["sharded"] and not ddp["sharded"]
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5)
    # Full fine-tuning in fp32, unsharded: weight + gradient + AdamW's 2 moments = 16 bytes per parameter,
    # plus AdamW's step counter (a float32 scalar per parameter tensor).
    from transformers import AutoModelForCausalLM

    tensors = list(AutoModelForCausalLM.from_pretrained(model).parameters())
    params = payload["models"]["tiny"]["parameters"]
    assert params == sum(t.numel() for t in tensors)
    assert ddp["state_bytes"] == 16 * params + 4 * len(tensors)
    # fsdp: each process holds its shard of the weights, gradients and moments (about half of them)
    assert fsdp["state_bytes"] < 0.6 * ddp["state_bytes"]
    assert fsdp["state_vs_ddp"] == pytest.approx(fsdp["state_bytes"] / ddp["state_bytes"])
    (goal,) = payload["goals"]
    assert goal["state_ok"] == (goal["state_vs_ddp"] <= 0.6)
