"""Stages cce-train-torch / cce-train-cce: train the GPT with one loss implementation.

``--loss-impl torch`` materialises the ``(B*T, V)`` logits and calls ``F.cross_entropy``;
``--loss-impl cce`` calls ``core.losses.linear_cross_entropy(hidden, head_weight, targets)``
(Cut Cross-Entropy, Wijmans et al. 2024, arXiv:2411.09009), which never builds the logits.
Same seed, same init, same batches. The run goes through ``core.engine.trainer.fit``
(checkpoints, DVCLive logs and ``identity.json`` in ``paths.runs/<impl>/``) inside
``core.engine.cache.cached_run``: ``paths.results/<impl>/run.json`` holds the measured figures
(final val loss/perplexity, tokens/s, peak memory, wall time) and the loss history under the
run's identity (params sub-tree, loss impl, token arrays, imported code); the loss CSVs are
written from it. A rerun under the same identity trains nothing; a changed param starts fresh.
"""

from __future__ import annotations

import argparse
import csv
import math
import resource
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ThroughputMonitor

from core.engine.cache import cached_run
from core.engine.config import entry_parser, parse_entry
from core.engine.dist import is_global_zero, world_size
from core.engine.identity import run_config
from core.engine.trainer import Run, ShardingAware, fit, seed_everything
from core.models.gpt import GPT, Block, GPTConfig
from core.optim import adamw_warmup_cosine
from core.utils.io import atomic_open
from projects.cce import DEFAULT_PARAMS, LOSS_IMPLS
from projects.cce.data import make_loaders

WARMUP_STEPS = 3  # steps left out of tokens/s (first-call allocations, lazy inits)
TOKENS_PER_S = "train/device/items_per_sec"  # ThroughputMonitor's key (items = tokens)
IDENTITY_KEYS = ("seed", "model", "optim", "train", "trainer")  # params that decide a run


class LMModule(ShardingAware, L.LightningModule):
    """Next-token LM training of :class:`GPT`; ``loss_impl`` picks materialised CE or CCE."""

    def __init__(self, model_cfg: dict, optim_cfg: dict, loss_impl: str = "torch") -> None:
        super().__init__()
        if loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
        self.save_hyperparameters()
        self.model = GPT(GPTConfig(**model_cfg))
        self.loss_impl, self.optim_cfg = loss_impl, optim_cfg
        self.flops_per_token = flops_per_token(self.model)
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
        self.flops_per_batch = batch[0].numel() * self.flops_per_token  # ThroughputMonitor
        # the global batch's loss: ranks hold equal token counts, so the mean of their means
        # (a no-op on one process)
        value = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")
        self.history["train"].append((self.global_step, value.item()))
        self.log("train/loss", value, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        # equal val shards per rank (make_loaders): the synced mean is the all-windows mean
        self.log("val/loss", self.loss(*batch), prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.history["val"].append(
                (self.global_step, self.trainer.callback_metrics["val/loss"].item())
            )

    def configure_optimizers(self):
        """AdamW (no decay on biases, norms, embeddings), linear warm-up then cosine decay.

        Under FSDP the parameters are flat 1-D shards here; the groups are chosen with the
        full (original-shape) views summoned, over the same parameter objects.
        """
        with self.full_params():
            opt, sched = adamw_warmup_cosine(self, self.optim_cfg, self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["loss_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = checkpoint.get("loss_history", self.history)


def flops_per_token(model: GPT) -> int:
    """Training FLOPs per token, forward + backward: ``6 N + 12 L D T`` (Chowdhery et al.
    2022, PaLM, App. B), N the parameters without the position embedding; for MFU."""
    cfg = model.cfg
    n = model.num_params() - model.pos_emb.weight.numel()
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def tokens_per_s_steps(max_steps: int, log_every_n_steps: int) -> tuple[int, int]:
    """The steps tokens/s is measured over: after ``WARMUP_STEPS``, up to the last logged one."""
    return WARMUP_STEPS + 1, max_steps // log_every_n_steps * log_every_n_steps


def throughput_monitor(first: int, last: int) -> ThroughputMonitor:
    """Lightning's ThroughputMonitor with tokens as items; its window (one time stamp per step
    end, from step ``first - 1`` to ``last``) makes the value logged at step ``last`` (key
    ``TOKENS_PER_S``) the tokens/s of steps ``first..last``."""
    return ThroughputMonitor(
        batch_size_fn=lambda batch: batch[0].shape[0],  # windows per batch
        length_fn=lambda batch: batch[0].numel(),  # tokens per batch
        window_size=max(2, last - first + 2),
    )


def peak_memory_mb(device: torch.device) -> tuple[str, float]:
    """``("cuda_max_allocated", MB)`` on CUDA, else the process's peak RSS ``("cpu_peak_rss", MB)``."""
    if device.type == "cuda":
        return "cuda_max_allocated", torch.cuda.max_memory_allocated(device) / 2**20
    return "cpu_peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_csv(path: Path, rows: list[tuple[int, float]]) -> None:
    """A ``step,loss`` CSV (the DVC plot of the loss curves reads it)."""
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows((s, f"{v:.6f}") for s, v in rows)


def train(params: dict, loss_impl: str, run: Run) -> dict[str, Any]:
    """Train (or resume) ``run`` with ``loss_impl``; returns its figures and loss history."""
    seed_everything(params["seed"])
    paths, tcfg = params["paths"], params["trainer"]
    module = LMModule(params["model"], params["optim"], loss_impl)
    n_params = module.model.num_params()  # before FSDP shards the parameters
    train_dl, val_dl = make_loaders(
        paths["data"],
        params["model"]["block_size"],
        params["train"],
        tcfg["max_steps"],
        params["seed"],
        world_size(tcfg),
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    steps = tokens_per_s_steps(tcfg["max_steps"], tcfg.get("log_every_n_steps", 50))
    trainer = fit(
        module,
        tcfg,
        run,
        callbacks=[throughput_monitor(*steps)],
        train_dataloaders=train_dl,
        val_dataloaders=val_dl,
        fsdp_wrap={Block},
    )
    tokens_per_s = trainer.logged_metrics.get(TOKENS_PER_S)  # absent when a resume was short
    val_loss = trainer.validate(module, val_dl, verbose=False)[0]["val/loss"]
    mem_kind, mem_mb = peak_memory_mb(trainer.strategy.root_device)
    return {
        "loss_impl": loss_impl,
        "steps": trainer.global_step,
        "tokens_per_step": params["train"]["batch_size"] * params["model"]["block_size"],
        "final_train_loss": module.history["train"][-1][1],
        "final_val_loss": val_loss,
        "final_val_ppl": math.exp(val_loss),
        "tokens_per_s": None if tokens_per_s is None else float(tokens_per_s),
        "tokens_per_s_steps": None if tokens_per_s is None else list(steps),
        "peak_memory_mb": mem_mb,
        "peak_memory_kind": mem_kind,
        "n_params": n_params,
        "device": str(trainer.strategy.root_device),
        "torch_threads": torch.get_num_threads(),
        "history": module.history,
    }


def run(params: dict, loss_impl: str) -> dict[str, Any]:
    """The run record of ``loss_impl`` (reused while its identity holds, else trained), with
    its loss CSVs written beside it in ``paths.results/<impl>/``."""
    if loss_impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
    paths = params["paths"]
    res_dir = Path(paths["results"]) / loss_impl
    config = run_config({k: params[k] for k in IDENTITY_KEYS} | {"loss_impl": loss_impl})
    data = [Path(paths["data"]) / f"{split}.npy" for split in ("train", "val")]
    r = Run(Path(paths["runs"]) / loss_impl, config, data, name=f"cce-train-{loss_impl}")
    if not (r.dir / "checkpoints" / "last.ckpt").exists() and is_global_zero():
        # The weights are this stage's output too (kd distils from them): a committed record
        # without them, as on a fresh clone, is not a finished run.
        (res_dir / "run.json").unlink(missing_ok=True)
    record = cached_run(res_dir / "run.json", config, lambda: train(params, loss_impl, r), data)
    if is_global_zero():  # every rank trains; one writes
        write_csv(res_dir / "train_loss.csv", record["history"]["train"])
        write_csv(res_dir / "val_loss.csv", record["history"]["val"])
    return record


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line: the engine's options plus ``--loss-impl``."""
    parser = entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)
    parser.add_argument("--loss-impl", choices=LOSS_IMPLS, required=True)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, params, mach = parse_entry(build_parser(), argv)
    torch.set_num_threads(mach.threads)
    record = run(params, args.loss_impl)
    shown = {k: v for k, v in record.items() if k not in ("identity", "history")}
    print(f"cce-train-{args.loss_impl}: {shown}", flush=True)
    return record


if __name__ == "__main__":
    main()
