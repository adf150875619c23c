"""Stage calibration-fmnist-train: train-time calibration losses on Fashion-MNIST, logits saved.

Trains a small CNN (``core.models.cnn.SmallCNN``) per (loss, seed) with ERM (cross-entropy),
label smoothing, focal loss, mixup, RankMixup's MRL and M-NDCG (``core.losses``), and, for the
label-noise variant of Chidambaram & Ge 2024 (arXiv 2306.00740), ERM and mixup on labels with
symmetric noise. A held-out split of the training set (``cal_size`` images) is kept for the
post-hoc calibrators of stage calibration-fmnist-calibrate, which only reads the logits saved
here: ``<runs>/<run>/logits.pt`` holds, per evaluation set, the logits of the views
``core.calibration.make_views`` computes for the CA calibrator (V, N, C) and the labels;
``<runs>/<run>/model.pt`` the weights. Runs already on disk are skipped (resumable).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.calibration import make_views
from core.data.corruptions import BENCHMARK, HOLDOUT
from core.data.fashion_mnist import load_fashion_mnist
from core.data.fashion_mnist_c import load_corruption
from core.losses.calibration_losses import (
    focal,
    label_smoothing,
    mixup_batch,
    mixup_cross_entropy,
    mndcg,
    mrl,
)
from core.models.cnn import SmallCNN
from core.training import seed_everything
from core.utils.io import atomic_save_torch
from projects.calibration.train import load_params

N_CLASSES = 10
CORRUPTIONS = BENCHMARK + HOLDOUT


def run_name(loss: str, seed: int, noise: float = 0.0) -> str:
    """Directory name of one run, e.g. ``mixup_noise0.2_seed1``."""
    return f"{loss}_noise{noise:g}_seed{seed}"


def symmetric_noise(labels: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    """With probability ``rate`` replace each label (N,) by a uniformly drawn *other* class."""
    if not 0 <= rate < 1:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
    flip = torch.rand(labels.shape, generator=generator) < rate
    shift = torch.randint(1, N_CLASSES, labels.shape, generator=generator)
    return torch.where(flip, (labels + shift) % N_CLASSES, labels)


def _images(x: Tensor | np.ndarray) -> Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1]."""
    return torch.as_tensor(np.asarray(x)).float().div(255).unsqueeze(1)


def load_splits(cfg: dict[str, Any], fmnist_root: str, fmnist_c_root: str) -> dict[str, Any]:
    """Deterministic train / cal split of the 60k training set, the first ``test_size`` test
    images, and per severity a fixed subset (``per_corruption`` test indices, the same for all 19
    corruptions) of Fashion-MNIST-C pooled over corruptions:
    {name: (images (N, 1, 28, 28), labels (N,))}."""
    data = load_fashion_mnist(fmnist_root)
    g = torch.Generator().manual_seed(cfg["split_seed"])
    perm = torch.randperm(len(data.y_train), generator=g)
    cal, train = perm[: cfg["cal_size"]], perm[cfg["cal_size"] :][: cfg["train_size"]]
    sets = {
        "train": (_images(data.x_train[train]), data.y_train[train]),
        "cal": (_images(data.x_train[cal]), data.y_train[cal]),
        "test": (_images(data.x_test[: cfg["test_size"]]), data.y_test[: cfg["test_size"]]),
    }
    ood = cfg["ood"]
    idx = torch.randperm(len(data.y_test), generator=g)[: ood["per_corruption"]].numpy()
    for s in ood["severities"]:
        xs, ys = [], []
        for name in CORRUPTIONS:
            images, labels = load_corruption(name, s, fmnist_c_root)
            xs.append(_images(images[idx]))
            ys.append(torch.as_tensor(labels[idx]))
        sets[f"c{s}"] = (torch.cat(xs), torch.cat(ys))
    return sets


def loss_fn(model, xb: Tensor, yb: Tensor, loss: str, cfg: dict, g: torch.Generator) -> Tensor:
    """The training loss of one mini-batch; mixed batches share one forward with the raw batch."""
    if loss == "erm":
        return F.cross_entropy(model(xb), yb)
    if loss == "label_smoothing":
        return label_smoothing(model(xb), yb, smoothing=cfg["smoothing"])
    if loss == "focal":
        return focal(model(xb), yb, gamma=cfg["gamma"])
    if loss == "mixup":
        xm, tm, _ = mixup_batch(xb, yb, N_CLASSES, alpha=cfg["alpha"], generator=g)
        return mixup_cross_entropy(model(xm), tm)
    if loss in ("mrl", "mndcg"):
        m = 1 if loss == "mrl" else cfg["n_mixups"]
        mixed = [
            mixup_batch(xb, yb, N_CLASSES, alpha=cfg["mixup_alpha"], generator=g) for _ in range(m)
        ]
        out = model(torch.cat([xb] + [xm for xm, _, _ in mixed]))  # ((M + 1) N, C)
        logits, mixed_logits = out[: len(xb)], out[len(xb) :].view(m, len(xb), -1)
        mixed_targets = torch.stack([tm for _, tm, _ in mixed])  # (M, N, C)
        if loss == "mrl":
            return mrl(
                logits,
                yb,
                mixed_logits[0],
                mixed_targets[0],
                margin=cfg["margin"],
                alpha=cfg["alpha"],
            )
        return mndcg(logits, yb, mixed_logits, mixed_targets, alpha=cfg["alpha"])
    raise ValueError(f"unknown loss {loss!r}")


def train_model(x: Tensor, y: Tensor, loss: str, params: dict, seed: int) -> SmallCNN:
    """Adam on shuffled mini-batches for ``epochs`` epochs; returns the model in eval mode."""
    cfg = params["fmnist"]
    seed_everything(seed)  # also Beta(alpha, alpha) draws of mixup_batch
    g = torch.Generator().manual_seed(seed)
    model = SmallCNN(tuple(cfg["model"]["channels"]), cfg["model"]["hidden"], N_CLASSES)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["optim"]["lr"])
    for _ in range(cfg["optim"]["epochs"]):
        for idx in torch.randperm(len(x), generator=g).split(cfg["optim"]["batch_size"]):
            batch_loss = loss_fn(model, x[idx], y[idx], loss, cfg["losses"][loss], g)
            opt.zero_grad()
            batch_loss.backward()
            opt.step()
    return model.eval()


def jobs(params: dict) -> list[tuple[str, int, float]]:
    """(loss, seed, noise) of every run, the costliest losses first (better pool packing)."""
    cfg = params["fmnist"]
    main = [(loss, s, 0.0) for loss in cfg["losses"] for s in cfg["seeds"]]
    noisy = [
        (loss, s, float(r))
        for r in cfg["label_noise"]["rates"]
        if r > 0
        for loss in cfg["label_noise"]["losses"]
        for s in cfg["seeds"]
    ]
    cost = {"mndcg": 1 + cfg["losses"].get("mndcg", {}).get("n_mixups", 0), "mrl": 2}
    return sorted(main + noisy, key=lambda j: -cost.get(j[0], 1))


def run_one(job: tuple[str, int, float], params: dict, sets: dict[str, Any]) -> str:
    """Train one run and save its weights and evaluation logits; skip it when already saved."""
    loss, seed, noise = job
    out = Path(params["fmnist"]["paths"]["runs"]) / run_name(loss, seed, noise)
    if (out / "logits.pt").exists():
        return f"{out.name}: exists"
    start = time.perf_counter()
    x, y = sets["train"]
    cal_x, cal_y = sets["cal"]
    test_x, test_y = sets["test"]
    eval_sets = {"cal": (cal_x, cal_y), "test": (test_x, test_y)}
    views: tuple[str, ...] = tuple(params["fmnist"]["ca_views"])
    if noise > 0:  # same noisy distribution for training, calibration and test labels
        g = torch.Generator().manual_seed(10_000 + seed)
        y = symmetric_noise(y, noise, g)
        eval_sets = {
            "cal": (cal_x, symmetric_noise(cal_y, noise, g)),
            "test": (test_x, symmetric_noise(test_y, noise, g)),
        }
        views = ("identity",)  # only temperature scaling is applied to the noise runs
    else:
        eval_sets |= {k: v for k, v in sets.items() if k.startswith("c")}
    model = train_model(x, y, loss, params, seed)
    logits = {
        name: {"views": make_views(model, xs, views), "labels": ys}  # (V, N, C), (N,)
        for name, (xs, ys) in eval_sets.items()
    }
    atomic_save_torch(model.state_dict(), out / "model.pt")
    atomic_save_torch({"views": views, "sets": logits}, out / "logits.pt")
    acc = float(logits["test"]["views"][0].argmax(1).eq(eval_sets["test"][1]).float().mean())
    return f"{out.name}: test acc {acc:.4f} ({time.perf_counter() - start:.0f} s)"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch intra-op thread inside the block (tiny ops: extra threads only add sync cost on
    a busy 2-core box), the previous count restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_STATE: dict[str, Any] = {}


def _init_worker(params: dict, fmnist_root: str, fmnist_c_root: str) -> None:
    # tiny convs: one intra-op thread per process; parallelism comes from the process pool
    torch.set_num_threads(1)
    _STATE.update(params=params, sets=load_splits(params["fmnist"], fmnist_root, fmnist_c_root))


def _work(job: tuple[str, int, float]) -> str:
    return run_one(job, _STATE["params"], _STATE["sets"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="projects/calibration/params.yaml")
    parser.add_argument("--fmnist-root", default="datasets/fashion-mnist/processed")
    parser.add_argument("--fmnist-c-root", default="datasets/fashion-mnist-c/processed")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    init = (params, args.fmnist_root, args.fmnist_c_root)
    todo = jobs(params)
    workers = min(params["fmnist"]["workers"], len(todo))
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker, init) as pool:
            for line in pool.imap_unordered(_work, todo):
                print(line, flush=True)
        return
    with one_thread():
        _init_worker(*init)
        for job in todo:
            print(_work(job), flush=True)
    _STATE.clear()


if __name__ == "__main__":
    main()
