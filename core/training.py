"""Training conventions every project shares: seeds, a Trainer built from params, resumable fits.

A project's ``params.yaml`` has a ``trainer:`` block read by :func:`build_trainer`::

    trainer:
      max_epochs: 5          # or max_steps
      accelerator: auto      # cpu / gpu / auto
      devices: auto
      strategy: auto         # single device by default; "ddp" on several CPUs or GPUs
      precision: 32-true
      log_every_n_steps: 20
      gradient_clip_val: null
      deterministic: false

Checkpoints go to ``<out_dir>/checkpoints`` (``last.ckpt`` every epoch and on interrupt), the
DVCLive logger to ``<out_dir>/dvclive`` so ``dvc exp show`` / ``dvc plots show`` work, and
:func:`fit_resumable` continues from ``last.ckpt`` when a previous run was killed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["build_trainer", "fit_resumable", "last_checkpoint", "seed_everything"]

_TRAINER_KEYS = {
    "max_epochs",
    "max_steps",
    "min_epochs",
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "precision",
    "log_every_n_steps",
    "val_check_interval",
    "check_val_every_n_epoch",
    "limit_train_batches",
    "limit_val_batches",
    "gradient_clip_val",
    "accumulate_grad_batches",
    "deterministic",
    "num_sanity_val_steps",
    "enable_progress_bar",
}


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch (all devices) and the dataloader workers (Lightning's rule)."""
    import lightning as L

    L.seed_everything(seed, workers=True, verbose=False)


def last_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """``<out_dir>/checkpoints/last.ckpt`` if an earlier run left one, else None."""
    path = Path(out_dir) / "checkpoints" / "last.ckpt"
    return path if path.exists() else None


def build_trainer(
    cfg: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    callbacks: list | None = None,
    logger: bool = True,
    checkpoint: bool = True,
    **overrides: Any,
):
    """A ``lightning.Trainer`` from a params ``trainer:`` block.

    Unknown keys raise (a typo in params.yaml must not be silently ignored). ``strategy: ddp``
    on CPU uses gloo; ``devices`` then counts processes.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = {**dict(cfg or {}), **overrides}
    unknown = set(cfg) - _TRAINER_KEYS
    if unknown:
        raise ValueError(
            f"unknown trainer keys {sorted(unknown)}; allowed: {sorted(_TRAINER_KEYS)}"
        )
    cfg.setdefault("accelerator", "auto")
    cfg.setdefault("devices", "auto")
    cfg.setdefault("strategy", "auto")
    if cfg["strategy"] == "ddp" and cfg["accelerator"] == "cpu":
        from lightning.pytorch.strategies import DDPStrategy

        cfg["strategy"] = DDPStrategy(process_group_backend="gloo")
    out_dir = Path(out_dir)
    callbacks = list(callbacks or [])
    if checkpoint:
        callbacks.append(
            ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True, save_top_k=0)
        )
    loggers: Any = False
    if logger:
        from dvclive.lightning import DVCLiveLogger

        loggers = DVCLiveLogger(dir=str(out_dir / "dvclive"), save_dvc_exp=False, dvcyaml=False)
    return L.Trainer(
        default_root_dir=str(out_dir),
        callbacks=callbacks,
        logger=loggers,
        enable_checkpointing=checkpoint,
        **cfg,
    )


def fit_resumable(trainer, module, datamodule=None, *, out_dir: str | os.PathLike, **kwargs: Any):
    """``trainer.fit`` that resumes from ``<out_dir>/checkpoints/last.ckpt`` when it exists."""
    ckpt = last_checkpoint(out_dir)
    if ckpt is not None:
        print(f"resuming from {ckpt}")
    return trainer.fit(
        module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, **kwargs
    )
