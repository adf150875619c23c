"""Test-time adaptation on Fashion-MNIST-C: Tent, EATA, SAR, DeYO and RMT against source and BN.

Stages: ``train_source`` (the BatchNorm and GroupNorm ResNets on clean Fashion-MNIST),
``adapt`` (every method on every test stream, one cached run per norm, setting, method and
seed) and ``report`` (tables, claim verdicts, figure, DVC metrics). ``methods`` holds one
module per paper; ``source_model`` the checkpoint paths and loader the stages share.
"""

DEFAULT_PARAMS = "projects/tta/params.yaml"  # relative to the repository root (DVC's wdir)
