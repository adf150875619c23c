"""LM part of the KD project: params, the cce teacher, token windows, losses, evaluation.

Teacher = the GPT trained by the cce project's stage cce-train-torch (a Lightning checkpoint
whose ``state_dict`` holds ``model.*`` weights and whose hyper-parameters hold the GPT config);
student = a smaller :class:`core.models.gpt.GPT` with the same vocabulary. Token-level KD goes
through ``core.losses.linear_kd_loss`` (never the ``(N, V)`` logits); the CE-only baseline
through ``core.losses.linear_cross_entropy``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from core.losses import linear_cross_entropy, linear_kd_loss
from core.models.gpt import GPT, GPTConfig

DEFAULT_PARAMS = Path("projects/kd/params.yaml")
RUN_KEYS = ("divergence", "temperature", "hard_weight")  # the rest of a run's dict: hparams


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The whole kd params dict (the LM part reads ``seed``, ``threads`` and ``lm``)."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_teacher(ckpt_path: str | Path) -> GPT:
    """The cce GPT from a Lightning checkpoint, in eval mode with gradients off."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # our own pipeline's file
    model = GPT(GPTConfig(**ckpt["hyper_parameters"]["model_cfg"]))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def make_student(teacher_cfg: GPTConfig, student_cfg: dict, seed: int) -> GPT:
    """A smaller GPT sharing the teacher's vocabulary and context; seeded, so every run starts
    from the same weights."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=teacher_cfg.vocab_size, block_size=teacher_cfg.block_size)
    return GPT(GPTConfig(**{**cfg, **student_cfg}))


def window_batches(
    tokens: np.ndarray, block_size: int, n_windows: int, batch_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_windows`` windows at seeded random starts (as projects/cce/data.py draws them), in
    batches of ``(x (B, T), y (B, T))`` int64 with ``y`` the next tokens; same seed, same batches."""
    if tokens.ndim != 1 or tokens.size < block_size + 2:
        raise ValueError(f"need a 1-D token array longer than {block_size + 1}, got {tokens.shape}")
    starts = np.random.default_rng(seed).integers(0, tokens.size - block_size - 1, size=n_windows)
    windows = np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)
    w = torch.from_numpy(windows)  # (n_windows, T + 1)
    return [(b[:, :-1], b[:, 1:]) for b in w.split(batch_size)]


def split_run(run: dict) -> tuple[dict, dict]:
    """A run's params -> (linear_kd_loss keywords, divergence hparams such as lam / mu / beta)."""
    return {k: run[k] for k in RUN_KEYS if k in run}, {
        k: v for k, v in run.items() if k not in RUN_KEYS
    }


def step_loss(student: GPT, teacher: GPT | None, x: torch.Tensor, y: torch.Tensor, run: dict):
    """Training loss of one batch ``x, y (B, T)``: CE when ``run`` has no ``divergence``, else
    ``(1 - h) T^2 D(p_t || p_s) + h CE`` through the fused ``linear_kd_loss``."""
    hidden = student(x).flatten(0, 1)  # (B*T, D_s)
    if run.get("divergence") is None:
        return linear_cross_entropy(hidden, student.head_weight, y.flatten())
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


@torch.no_grad()
def evaluate(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy (nats per token) over all tokens of ``batches``."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in batches:
        h = model(x).flatten(0, 1)  # (B*T, D)
        total += float(linear_cross_entropy(h, model.head_weight, y.flatten(), reduction="sum"))
        n += y.numel()
    model.train(was_training)
    return total / n
