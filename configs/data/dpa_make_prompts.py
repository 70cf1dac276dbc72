"""Write the prompt files of configs/dpa_example.yaml (deterministic; rerun to regenerate):

    python configs/data/dpa_make_prompts.py

Questions with one short answer from the DPA demo's task bank (pyalign.demo.dpa_tasks:
arithmetic, unit conversion, capitals), each row {prompt, answer, kind, aliases}: 32 training
prompts (two halves of 16, used in turn) and 8 held-out ones for the front.
"""

from __future__ import annotations

from pathlib import Path

from pyalign.demo.dpa_tasks import make_tasks
from pyalign.io import write_jsonl_atomic

HERE = Path(__file__).resolve().parent


def main() -> None:
    tasks = make_tasks(40, seed=7)
    write_jsonl_atomic(HERE / "dpa_prompts_train.jsonl", [t.to_record() for t in tasks[:32]])
    write_jsonl_atomic(HERE / "dpa_prompts_eval.jsonl", [t.to_record() for t in tasks[32:]])


if __name__ == "__main__":
    main()
