"""Benchmarks of pyalign against eager PyTorch, torch.compile, Liger-Kernel and Cut Cross-Entropy.

``python -m bench.logprobs``: DPO loss from logits (forward + backward), SPEC section 4 first table.
``python -m bench.linear``: DPO loss from hidden states and the lm_head weight, second table.
Results (JSON, markdown, PNG) go under ``bench/results``; see ``bench/NOTES.md``.
"""
