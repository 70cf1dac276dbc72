"""``task: sft``: supervised fine-tuning of a LoRA on (prompt, response) examples, NLL of the
response tokens through the fused lm_head, merged into a new model folder.

- :mod:`pyalign.tasks.sft.config`: the config;
- :mod:`pyalign.tasks.sft.data`: JSONL examples -> padded batches (also the DPA loop's SFT data);
- :mod:`pyalign.tasks.sft.run`: the run (one LoRA stage, resume, finished-run check).
"""

from pyalign.tasks.sft.config import SFTConfig, SFTDataConfig, check_sft
from pyalign.tasks.sft.data import SFTDataset, SFTExample, load_sft_examples
from pyalign.tasks.sft.run import SFTResult, run_sft, summary
from pyalign.train import Task, register_task

__all__ = ["SFTConfig", "SFTDataConfig", "SFTDataset", "SFTExample", "SFTResult", "load_sft_examples", "run_sft"]

register_task(Task("sft", SFTConfig, run_sft, check=check_sft, summary=summary,
                   doc="supervised fine-tuning on {prompt, response} examples (NLL of response tokens)"))
