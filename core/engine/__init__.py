"""The experiment engine every project trains through (design.md, "The experiment engine").

- :mod:`core.engine.config`: params files, variants, ``--set`` overrides, machine knobs, the CLI;
- :mod:`core.engine.identity`: run identity = resolved config + imported code + input data;
- :mod:`core.engine.cache`: per-run results and checkpoints reused only under the same identity;
- :mod:`core.engine.trainer`: a Lightning Trainer / Fabric from params, identity-aware ``fit``;
- :mod:`core.engine.progress`: one line per run with an ETA for multi-run stages;
- :mod:`core.engine.dist`: ranks under a distributed strategy (only rank 0 writes) and the rule
  between ``machine.workers`` process pools and DDP.

Import the submodules themselves: the Trainer side pulls in Lightning, which report stages
and data stages do not need.
"""
