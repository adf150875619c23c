"""The Lightning side of the engine: a Trainer or a Fabric built from params, identity-aware fits.

A project's params hold a ``trainer:`` block read by :func:`build_trainer` / :func:`build_fabric`::

    trainer:
      max_epochs: 5          # or max_steps
      accelerator: cpu       # cpu / gpu / auto
      devices: 1
      strategy: auto         # "ddp" on several CPU processes (gloo) or GPUs, "fsdp", ...
      num_nodes: 1
      precision: 32-true     # bf16-mixed, 16-mixed, ...

:func:`fit` trains a LightningModule in a run directory that belongs to one run identity
(:mod:`core.engine.identity`): checkpoints (``last.ckpt`` every epoch), DVCLive logs and
``identity.json``. It resumes from ``last.ckpt`` only when that identity still holds; a changed
config, input or imported module starts the run fresh. Progress: Lightning's bar on a terminal,
one compact line per epoch / validation otherwise (logs, CI). Fabric serves loops whose steps
are too short for the Trainer's per-step hooks (the overhead is measured in
``tests/core/test_engine_trainer.py``'s docstring and the engine README section).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from core.engine.cache import claim_run_dir, seal_run_dir
from core.engine.identity import code_digests

__all__ = [
    "EpochLine",
    "Run",
    "ShardingAware",
    "TRAINER_KEYS",
    "build_fabric",
    "build_trainer",
    "fit",
    "interactive",
    "seed_everything",
    "strategy",
]

TRAINER_KEYS = frozenset(
    {
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
        "enable_model_summary",
        "sync_batchnorm",
    }
)
FABRIC_KEYS = frozenset({"accelerator", "devices", "num_nodes", "strategy", "precision"})


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch (all devices) and the dataloader workers (Lightning's rule)."""
    L.seed_everything(seed, workers=True, verbose=False)


def interactive() -> bool:
    """True when stderr is a terminal (progress bars) rather than a log file or CI."""
    return sys.stderr.isatty()


def _quiet_lightning() -> None:
    """Keep Lightning's per-fit banners (GPU available, LOCAL_RANK, ...) out of logs and CI."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def strategy(cfg: Mapping[str, Any], fsdp_wrap: Iterable[type] = ()) -> Any:
    """The Lightning strategy of a ``trainer:`` block. ``ddp`` on CPU gets the gloo backend;
    ``fsdp`` is FSDPStrategy with each module of a ``fsdp_wrap`` class (a GPT's transformer
    blocks) as its own unit, the rest (embeddings, a tied head, final norms) in the root unit,
    gathered for the whole step; original parameters kept (``use_orig_params``: names and
    tying as without FSDP), no activation checkpointing. FSDP needs GPUs (Lightning and torch
    refuse it on CPU). Everything else is Lightning's own string or object.

    Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel",
    arXiv:2304.11277."""
    name = cfg.get("strategy", "auto")
    if name == "ddp" and cfg.get("accelerator") == "cpu":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo")
    if name == "fsdp":
        wrap = set(fsdp_wrap)
        if not wrap:
            raise ValueError(
                "trainer.strategy 'fsdp' needs the module classes to shard (fsdp_wrap)"
            )
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(
            auto_wrap_policy=wrap, activation_checkpointing_policy=None, use_orig_params=True
        )
    return name


class ShardingAware:
    """LightningModule mixin for models that may train under FSDP: ``full_params()`` shows the
    parameters with their original shapes (FSDP keeps flat 1-D shards outside forward) for
    choices that read shapes, such as weight-decay groups; gradients are clipped by the global
    norm through the FSDP root's ``clip_grad_norm_`` (Lightning's FSDP precision plugin refuses
    ``gradient_clip_val``). Without FSDP both are Lightning's defaults."""

    def _fsdp_root(self) -> Any:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = self.trainer.model
        return model if isinstance(model, FSDP) else None

    def full_params(self) -> Any:
        """A context in which parameters have their full shapes (a no-op without FSDP)."""
        root = self._fsdp_root()
        if root is None:
            return contextlib.nullcontext()
        return type(root).summon_full_params(root, writeback=False)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        root = self._fsdp_root() if gradient_clip_val else None
        if root is not None and gradient_clip_algorithm in (None, "norm"):
            root.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def _checked(cfg: Mapping[str, Any] | None, allowed: frozenset[str], what: str) -> dict[str, Any]:
    cfg = dict(cfg or {})
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    cfg.setdefault("accelerator", "auto")
    cfg.setdefault("devices", "auto")
    cfg.setdefault("strategy", "auto")
    return cfg


def _check_sync_batchnorm(cfg: Mapping[str, Any]) -> None:
    """``sync_batchnorm: true`` (BatchNorm statistics over every rank under DDP, so a BN model
    on W processes normalises like one process; no effect on one device) needs GPU/XPU
    devices: torch's SyncBatchNorm refuses CPU tensors, so a CPU trainer is refused here by name
    rather than in the first forward. Without it, BN layers use per-rank batch statistics."""
    if not cfg.get("sync_batchnorm"):
        return
    accelerator = cfg.get("accelerator", "auto")
    cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if cpu:
        raise ValueError(
            "trainer.sync_batchnorm=True needs GPU devices (torch's SyncBatchNorm refuses CPU "
            f"tensors), got accelerator={accelerator!r} on this machine: set it in a GPU "
            "variant, or leave it false (per-rank BatchNorm statistics)"
        )


class EpochLine(Callback):
    """One line per finished epoch and per validation: ``[name] epoch 2/8 step 160 · metric
    value ... · 12.3 s``, for logs and CI where a progress bar would be noise."""

    def __init__(self, name: str = "") -> None:
        self.name, self._t0 = name, time.perf_counter()

    def _line(self, trainer, what: str) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        parts = []
        for k, v in sorted(trainer.callback_metrics.items()):
            if torch.is_tensor(v) and v.numel() == 1:
                parts.append(f"{k} {float(v):.4g}")
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        steps = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        head = f"[{self.name}] " if self.name else ""
        where = f"{head}{what} epoch {trainer.current_epoch + 1}/{epochs}"
        where += f" step {trainer.global_step}{steps}"
        seconds = f"{time.perf_counter() - self._t0:.1f} s"
        print(" · ".join([where, *parts, seconds]), flush=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._line(trainer, "train")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._line(trainer, "val")


class _SealIdentity(Callback):
    """Writes ``identity.json`` whenever a checkpoint is saved (code as imported by then)."""

    def __init__(self, run: Run, since: dict[str, str]) -> None:
        self.run, self.since = run, since

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.is_global_zero:
            seal_run_dir(self.run.dir, self.run.config, self.run.data, self.since)


@dataclass
class Run:
    """A training run: its directory (checkpoints, logs, identity) and what identifies it.

    ``config``: the resolved params that decide the result (no machine knobs); ``data``: the
    input files or directories whose content the result depends on.
    """

    dir: Path
    config: Mapping[str, Any]
    data: Iterable[str | os.PathLike] = field(default_factory=tuple)
    name: str = ""

    def __post_init__(self) -> None:
        self.dir, self.data = Path(self.dir), tuple(self.data)
        self.name = self.name or self.dir.name


def build_trainer(
    cfg: Mapping[str, Any] | None,
    out_dir: str | os.PathLike,
    *,
    callbacks: Iterable[Callback] = (),
    logger: bool = True,
    checkpoint: bool = True,
    name: str = "",
    fsdp_wrap: Iterable[type] = (),
    **overrides: Any,
) -> L.Trainer:
    """A ``lightning.Trainer`` from a params ``trainer:`` block (plus ``overrides``).

    Unknown keys raise (a typo in params.yaml must not be silently ignored). ``strategy: ddp``
    on CPU uses gloo; ``devices`` then counts processes; ``strategy: fsdp`` shards the modules
    of the ``fsdp_wrap`` classes (:func:`strategy`). Checkpoints go to
    ``out_dir/checkpoints`` (``last.ckpt``), DVCLive logs to ``out_dir/dvclive``. The progress
    bar shows on a terminal; elsewhere :class:`EpochLine` prints one line per epoch.
    """
    cfg = _checked({**dict(cfg or {}), **overrides}, TRAINER_KEYS, "trainer")
    _check_sync_batchnorm(cfg)
    cfg["strategy"] = strategy(cfg, fsdp_wrap)
    tty = interactive()
    cfg.setdefault("enable_progress_bar", tty)
    cfg.setdefault("enable_model_summary", tty)
    if not tty:
        _quiet_lightning()
    out_dir = Path(out_dir)
    callbacks = list(callbacks)
    if not cfg["enable_progress_bar"]:
        callbacks.append(EpochLine(name))
    if checkpoint:
        from lightning.pytorch.callbacks import ModelCheckpoint

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


def fit(
    module: L.LightningModule,
    cfg: Mapping[str, Any] | None,
    run: Run,
    *,
    callbacks: Iterable[Callback] = (),
    logger: bool = True,
    checkpoint: bool = True,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    datamodule: Any = None,
    fsdp_wrap: Iterable[type] = (),
    **overrides: Any,
) -> L.Trainer:
    """Train ``module`` for ``run`` and return the Trainer.

    Resumes from ``run.dir/checkpoints/last.ckpt`` only when ``run.dir/identity.json`` still
    holds for ``run`` (:func:`core.engine.cache.claim_run_dir`); otherwise stale checkpoints
    and logs are cleared and the run starts fresh. ``identity.json`` is rewritten with every
    checkpoint and at the end.
    """
    resumable = claim_run_dir(run.dir, run.config, run.data) if checkpoint else False
    since = code_digests()
    extra = [_SealIdentity(run, since)] if checkpoint else []
    trainer = build_trainer(
        cfg,
        run.dir,
        callbacks=[*callbacks, *extra],
        logger=logger,
        checkpoint=checkpoint,
        name=run.name,
        fsdp_wrap=fsdp_wrap,
        **overrides,
    )
    last = run.dir / "checkpoints" / "last.ckpt"
    ckpt = str(last) if resumable and last.exists() else None
    if ckpt:
        print(f"[{run.name}] resuming from {last}", flush=True)
    trainer.fit(
        module,
        train_dataloaders=train_dataloaders,
        val_dataloaders=val_dataloaders,
        datamodule=datamodule,
        ckpt_path=ckpt,
    )
    if checkpoint and trainer.is_global_zero:
        seal_run_dir(run.dir, run.config, run.data, since)
    return trainer


def build_fabric(cfg: Mapping[str, Any] | None = None, **overrides: Any) -> L.Fabric:
    """A ``lightning.Fabric`` from the device keys of a ``trainer:`` block (accelerator,
    devices, num_nodes, strategy, precision; loop keys such as max_epochs are ignored).

    For training loops whose steps are so short that the Trainer's hooks would cost as much as
    the maths (tiny CNNs, test-time adaptation). ``fabric.launch()`` is the caller's when
    ``devices`` > 1.
    """
    cfg = {k: v for k, v in {**dict(cfg or {}), **overrides}.items() if k in FABRIC_KEYS}
    cfg = _checked(cfg, FABRIC_KEYS, "fabric")
    if cfg["strategy"] == "ddp" and cfg["accelerator"] == "cpu":
        from lightning.fabric.strategies import DDPStrategy

        cfg["strategy"] = DDPStrategy(process_group_backend="gloo")
    if not interactive():
        _quiet_lightning()
    return L.Fabric(**cfg)
