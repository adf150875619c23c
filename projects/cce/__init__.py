"""Cut Cross-Entropy language-model project (Wijmans et al. 2024, arXiv:2411.09009).

A small GPT over a byte-level BPE tokenizer on the CPython standard library, trained twice with
the same seed and data order: once with ``F.cross_entropy`` on materialised logits, once with
``core.losses.linear_cross_entropy``; plus the loss+grad memory/time benchmark of the kernel.
The two names every entry point shares live here: the default params file and the loss impls.
"""

DEFAULT_PARAMS = "projects/cce/params.yaml"  # relative to the repository root (DVC's wdir)
LOSS_IMPLS = ("torch", "cce")  # materialised logits + F.cross_entropy, or linear_cross_entropy
