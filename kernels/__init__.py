"""Triton kernels of pyalign (installed as the package `pyalign.kernels`).

Importing a kernel module imports triton; set TRITON_INTERPRET=1 before that import to run the
kernels on the CPU (slow; for tests).
"""
