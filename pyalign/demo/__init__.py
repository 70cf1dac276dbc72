"""The SPO demonstrative experiment (``make demo``): see :mod:`pyalign.demo.spo_markers`."""
