"""Token-level KD of a GPT student: the cce teacher, token windows and the LightningModule.

Teacher = the GPT trained by the cce project's stage cce-train-torch (a Lightning checkpoint
whose ``state_dict`` holds ``model.*`` weights and whose hyper-parameters hold the GPT config);
student = a smaller :class:`core.models.gpt.GPT` with the same vocabulary. KD goes through the
fused ``core.losses.linear_kd_loss`` (never the ``(N, V)`` logits); the CE-only baseline
through ``core.losses.linear_cross_entropy``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric

from core.engine.dist import rank_loader
from core.engine.trainer import ShardingAware
from core.losses import linear_cross_entropy, linear_kd_loss
from core.models.gpt import GPT, GPTConfig
from core.optim import adamw_warmup_cosine

RUN_KEYS = ("divergence", "temperature", "hard_weight")  # the rest of a run's dict: hparams


def load_teacher(ckpt_path: str | os.PathLike) -> GPT:
    """The cce GPT from a Lightning checkpoint, in eval mode with gradients off."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # our own pipeline's file
    model = GPT(GPTConfig(**ckpt["hyper_parameters"]["model_cfg"]))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def make_student(teacher_cfg: GPTConfig, student_cfg: dict[str, Any], seed: int) -> GPT:
    """A smaller GPT sharing the teacher's vocabulary and context, initialised from ``seed``."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=teacher_cfg.vocab_size, block_size=teacher_cfg.block_size)
    return GPT(GPTConfig(**{**cfg, **student_cfg}))


def window_batches(
    tokens: np.ndarray, block_size: int, n_windows: int, batch_size: int, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """``n_windows`` windows at seeded random starts, in batches of ``(x (B, T), y (B, T))``
    int64 with ``y`` the next tokens; same seed, same batches."""
    if tokens.ndim != 1 or tokens.size < block_size + 2:
        raise ValueError(f"need a 1-D token array longer than {block_size + 1}, got {tokens.shape}")
    starts = np.random.default_rng(seed).integers(0, tokens.size - block_size - 1, size=n_windows)
    windows = np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)
    w = torch.from_numpy(windows)  # (n_windows, T + 1)
    return [(b[:, :-1], b[:, 1:]) for b in w.split(batch_size)]


class _Batches(Dataset):
    def __init__(self, batches: Sequence[tuple[Tensor, Tensor]]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.batches[i]


def batch_loader(batches: Sequence[tuple[Tensor, Tensor]], world: int = 1) -> DataLoader:
    """The given (x, y) batches, in order, as a DataLoader (no collation); over ``world`` ranks
    each loads its rows of every batch (``core.engine.dist.rank_loader``)."""
    return rank_loader(
        _Batches, batches, world,
        rows=lambda b: len(b[0]), shard=lambda b, r, w: (b[0][r::w], b[1][r::w]),
    )  # fmt: skip


def split_run(run: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's params -> (linear_kd_loss keywords, divergence hparams such as lam / mu / beta)."""
    kw = {k: run[k] for k in RUN_KEYS if k in run}
    return kw, {k: v for k, v in run.items() if k not in RUN_KEYS}


def step_loss(
    student: GPT, teacher: GPT | None, x: Tensor, y: Tensor, run: dict[str, Any]
) -> Tensor:
    """Training loss of one batch ``x, y (B, T)``: CE when ``run`` has no ``divergence``, else
    ``(1 - h) T^2 D(p_t || p_s) + h CE`` through the fused ``linear_kd_loss`` (Hinton et al.
    2015, arXiv:1503.02531; the divergence's paper in core/losses/divergences.py)."""
    hidden = student(x).flatten(0, 1)  # (B*T, D_s)
    if run.get("divergence") is None:
        return linear_cross_entropy(hidden, student.head_weight, y.flatten())
    if teacher is None:
        raise ValueError(f"run with divergence {run['divergence']!r} needs a teacher")
    with torch.no_grad():
        t_hidden = teacher(x).flatten(0, 1)  # (B*T, D_t)
    kw, hparams = split_run(run)
    return linear_kd_loss(
        hidden,
        student.head_weight,
        t_hidden,
        teacher.head_weight,
        targets=y.flatten(),
        ignore_index=-100,
        **kw,
        **hparams,
    )


class LMDistill(ShardingAware, L.LightningModule):
    """A GPT student trained by ``step_loss`` (KD from a frozen teacher, or CE alone).

    The teacher is a submodule (it follows the student to the device) kept in eval mode with
    gradients off; the optimiser sees the student only. Validation: mean next-token CE in nats
    per token over every validation token (``val/loss``), recorded in ``curve`` as
    (step, loss) for the report.
    """

    def __init__(
        self,
        student: GPT,
        teacher: GPT | None,
        run: dict[str, Any],
        optim: dict[str, Any],
        total_steps: int,
    ) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        self.run_cfg, self.optim, self.total_steps = run, optim, total_steps
        self.val_loss = MeanMetric()
        self.curve: list[tuple[int, float]] = []

    def train(self, mode: bool = True) -> LMDistill:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
        x, y = batch
        loss = step_loss(self.student, self.teacher, x, y, self.run_cfg)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {self.global_step}")
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], _: int) -> None:
        x, y = batch
        h = self.student(x).flatten(0, 1)  # (B*T, D)
        ce = linear_cross_entropy(h, self.student.head_weight, y.flatten())
        self.val_loss.update(ce, weight=y.numel())

    def on_validation_epoch_end(self) -> None:
        value = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", value)
        if not self.trainer.sanity_checking:
            self.curve.append((int(self.global_step), float(value)))

    def configure_optimizers(self) -> dict[str, Any]:
        """The cce recipe over the student; under FSDP the decay groups are chosen with the
        full (original-shape) parameter views summoned (outside, they are flat shards)."""
        with self.full_params():
            opt, sched = adamw_warmup_cosine(self.student, self.optim, self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def evaluate(model: GPT, batches: Sequence[tuple[Tensor, Tensor]]) -> float:
    """Mean next-token cross-entropy (nats per token) of ``model`` over every token of
    ``batches`` (the teacher's score on the students' validation windows)."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for x, y in batches:
        h = model(x.to(device)).flatten(0, 1)  # (B*T, D)
        y = y.to(device).flatten()
        total += float(linear_cross_entropy(h, model.head_weight, y, reduction="sum"))
        n += y.numel()
    return total / n
