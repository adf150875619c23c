"""Knowledge distillation: divergences for offline/online KD on Fashion-MNIST and token-level KD of a GPT."""

from pathlib import Path
from typing import Any

from core.engine.dist import launched_world_size, processes

DEFAULT_PARAMS = Path("projects/kd/params.yaml")


def strategy(trainer_cfg: dict[str, Any]) -> Any:
    """The Lightning strategy of ``trainer_cfg``: ``fsdp`` is FSDPStrategy sharding each GPT
    :class:`~core.models.gpt.Block` (student's and teacher's) as a unit; embeddings, tied heads
    and final norms stay in the root unit, gathered for the whole step, so the fused losses read
    full head weights; original parameters kept, no activation checkpointing. GPUs only
    (Lightning and torch refuse FSDP on CPU). Anything else goes to the engine unchanged."""
    name = trainer_cfg.get("strategy", "auto")
    if name != "fsdp":
        return name
    from lightning.pytorch.strategies import FSDPStrategy

    from core.models.gpt import Block

    return FSDPStrategy(
        auto_wrap_policy={Block}, activation_checkpointing_policy=None, use_orig_params=True
    )


def world_size(trainer_cfg: dict[str, Any]) -> int:
    """Training processes of a ``trainer:`` block: devices x num_nodes, or the launcher's count
    (torchrun, srun) when Lightning picks the devices."""
    n = processes(trainer_cfg)
    return n if n is not None else launched_world_size()
