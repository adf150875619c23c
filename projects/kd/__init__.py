"""Knowledge distillation: divergences for offline/online KD on Fashion-MNIST and token-level KD of a GPT."""

from pathlib import Path

DEFAULT_PARAMS = Path("projects/kd/params.yaml")
