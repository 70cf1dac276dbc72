"""Integrations with model libraries (transformers / peft) for the fused lm_head path.

Imported lazily (``from pyalign.integrations import hf``) so that ``import pyalign`` does not import
transformers.
"""
