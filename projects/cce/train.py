"""Stages cce-train-torch / cce-train-cce: train the GPT with one loss implementation.

``--loss-impl torch`` materialises the ``(B*T, V)`` logits and calls ``F.cross_entropy``;
``--loss-impl cce`` calls ``core.losses.linear_cross_entropy(hidden, head_weight, targets)``
(Cut Cross-Entropy, Wijmans et al. 2024, arXiv:2411.09009), which never builds the logits.
Same seed, same init, same batches. Writes to ``paths.results/<impl>/``: ``metrics.json``
(final val loss/perplexity, tokens/s, peak memory), ``train_loss.csv``, ``val_loss.csv``;
checkpoints and DVCLive logs go to ``paths.runs/<impl>/``.
"""

from __future__ import annotations

import csv
import math
import resource
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from core.models.gpt import GPT, GPTConfig
from core.optim import adamw_warmup_cosine
from core.training import build_trainer, fit_resumable, seed_everything
from core.utils.io import atomic_open, atomic_write_json
from projects.cce.common import LOSS_IMPLS, arg_parser, load_params
from projects.cce.data import make_loaders


class LMModule(L.LightningModule):
    """Next-token LM training of :class:`GPT`; ``loss_impl`` picks materialised CE or CCE."""

    def __init__(self, model_cfg: dict, optim_cfg: dict, loss_impl: str = "torch") -> None:
        super().__init__()
        if loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
        self.save_hyperparameters()
        self.model = GPT(GPTConfig(**model_cfg))
        self.loss_impl, self.optim_cfg = loss_impl, optim_cfg
        self.history: dict[str, list[tuple[int, float]]] = {"train": [], "val": []}

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of inputs ``x (B, T)`` against targets ``y (B, T)``."""
        hidden = self.model(x).flatten(0, 1)  # (B*T, D)
        if self.loss_impl == "torch":
            return F.cross_entropy(self.model.logits(hidden), y.flatten())  # logits (B*T, V)
        from core.losses import linear_cross_entropy

        weight = self.model.head_weight
        if torch.is_autocast_enabled(hidden.device.type):  # match F.linear's autocast dtype
            dtype = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        return linear_cross_entropy(hidden, weight, y.flatten())

    def training_step(self, batch, batch_idx):
        loss = self.loss(*batch)
        self.history["train"].append((self.global_step, loss.item()))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(*batch), prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.history["val"].append(
                (self.global_step, self.trainer.callback_metrics["val/loss"].item())
            )

    def configure_optimizers(self):
        """AdamW (no decay on biases, norms, embeddings), linear warm-up then cosine decay."""
        opt, sched = adamw_warmup_cosine(self, self.optim_cfg, self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["loss_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = checkpoint.get("loss_history", self.history)


class Throughput(L.Callback):
    """Training tokens/s over the steps after ``skip`` warm-up steps, and peak memory."""

    def __init__(self, skip: int = 3) -> None:
        self.skip, self.tokens, self.seconds, self.steps, self._t0 = skip, 0, 0.0, 0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        self.steps += 1
        if self.steps > self.skip:
            self.seconds += time.perf_counter() - self._t0
            self.tokens += batch[0].numel()

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def peak_memory_mb(device: torch.device) -> tuple[str, float]:
    """``("cuda_max_allocated", MB)`` on CUDA, else the process's peak RSS ``("cpu_peak_rss", MB)``."""
    if device.type == "cuda":
        return "cuda_max_allocated", torch.cuda.max_memory_allocated(device) / 2**20
    return "cpu_peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_csv(path: Path, rows: list[tuple[int, float]]) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows((s, f"{v:.6f}") for s, v in rows)


def run(params: dict, loss_impl: str) -> dict:
    """Train with ``loss_impl`` and write the metrics JSON and loss CSVs; returns the metrics."""
    seed_everything(params["seed"])
    paths, tcfg = params["paths"], params["trainer"]
    run_dir, res_dir = Path(paths["runs"]) / loss_impl, Path(paths["results"]) / loss_impl
    module = LMModule(params["model"], params["optim"], loss_impl)
    train_dl, val_dl = make_loaders(
        paths["data"],
        params["model"]["block_size"],
        params["train"],
        tcfg["max_steps"],
        params["seed"],
    )
    meter = Throughput()
    trainer = build_trainer(tcfg, run_dir, callbacks=[meter])
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fit_resumable(
        trainer, module, out_dir=run_dir, train_dataloaders=train_dl, val_dataloaders=val_dl
    )
    wall = time.perf_counter() - t0
    val_loss = trainer.validate(module, val_dl, verbose=False)[0]["val/loss"]
    mem_kind, mem_mb = peak_memory_mb(trainer.strategy.root_device)
    metrics = {
        "loss_impl": loss_impl,
        "steps": trainer.global_step,
        "tokens_per_step": params["train"]["batch_size"] * params["model"]["block_size"],
        "final_train_loss": module.history["train"][-1][1],
        "final_val_loss": val_loss,
        "final_val_ppl": math.exp(val_loss),
        "tokens_per_s": meter.tokens_per_s,
        "peak_memory_mb": mem_mb,
        "peak_memory_kind": mem_kind,
        "fit_wall_s": wall,
        "n_params": module.model.num_params(),
        "device": str(trainer.strategy.root_device),
        "torch_threads": torch.get_num_threads(),
    }
    write_csv(res_dir / "train_loss.csv", module.history["train"])
    write_csv(res_dir / "val_loss.csv", module.history["val"])
    atomic_write_json(res_dir / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--loss-impl", choices=LOSS_IMPLS, required=True)
    args = parser.parse_args(argv)
    metrics = run(load_params(args.params), args.loss_impl)
    print(metrics)


if __name__ == "__main__":
    main()
