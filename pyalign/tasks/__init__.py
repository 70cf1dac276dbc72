"""The tasks ``pyalign train CONFIG.yaml`` runs, one package per value of a config's ``task:``.

- :mod:`pyalign.tasks.preference`: DPO/IPO/APO/... rounds, one per preference dimension, SPO
  across them (``rounds``), adaptive alpha, and the offline evaluation of a run;
- :mod:`pyalign.tasks.sft`: supervised fine-tuning on (prompt, response) examples;
- :mod:`pyalign.tasks.reward_model`: training a multi-objective reward model
  (the model itself is the library :mod:`pyalign.reward_model`);
- :mod:`pyalign.tasks.dpa`: Directional Preference Alignment by rejection sampling.

Each package owns its config, its data and its loop, and registers itself with the engine's task
registry (:mod:`pyalign.train.registry`) when it is imported; the registry imports a package the
first time a config asks for its task. A task uses the engine only through ``pyalign.train``'s
exports (tests/test_layers.py checks it).
"""
