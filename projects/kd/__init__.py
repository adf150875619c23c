"""Knowledge distillation: divergences for offline/online KD on Fashion-MNIST and token-level KD of a GPT."""

from pathlib import Path
from typing import Any

from core.engine.dist import launched_world_size, processes

DEFAULT_PARAMS = Path("projects/kd/params.yaml")


def world_size(trainer_cfg: dict[str, Any]) -> int:
    """Training processes of a ``trainer:`` block: devices x num_nodes, or the launcher's count
    (torchrun, srun) when Lightning picks the devices."""
    n = processes(trainer_cfg)
    return n if n is not None else launched_world_size()
