"""Stage calibration-fmnist-train: every (loss, seed, noise) Fashion-MNIST run, logits saved.

Each run trains ``classifier.LossClassifier`` (the params' network and a loss from
``core.losses``) with the engine's Lightning Trainer on ``train_size`` images until it
(nearly) interpolates them, the regime where uncalibrated ERM is overconfident (Guo et al. 2017,
arXiv:1706.04599). The label-noise runs (ERM and mixup on symmetric noise; Chidambaram & Ge
2024, arXiv:2306.00740) see the same noisy distribution in training, calibration and test
labels. A run is reused only under its run identity (``core.engine.cache.cached_run``: config,
imported code, input data). Writes per run, under ``<paths.runs>/fmnist/<run>/``:
``logits.pt`` (per evaluation set the (V, N, C) logits of the CA views, identity first, and the
labels), ``model.pt`` and ``result.json`` (identity, per-epoch history, train fit). Under
``trainer.strategy: ddp`` (``--workers 1``) every rank trains each run and evaluates the full
sets with the synced weights; only global rank 0 writes.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from core.calibration import make_views
from core.engine.cache import cached_run, load_cached
from core.engine.config import entry_parser, parse_entry
from core.engine.dist import check_pool, is_global_zero
from core.engine.progress import RunProgress
from core.engine.trainer import build_trainer, seed_everything
from core.losses import get_loss
from core.utils.io import atomic_save_torch
from core.utils.parallel import imap_processes
from projects.calibration.classifier import LossClassifier, build_net
from projects.calibration.fmnist_data import N_CLASSES, load_splits, symmetric_noise
from projects.calibration.runs import Job, fmnist_dir, jobs, run_name

DEFAULT_PARAMS = "projects/calibration/params.yaml"
FMNIST_ROOT = "datasets/fashion-mnist/processed"
FMNIST_C_ROOT = "datasets/fashion-mnist-c/processed"
RESULT = "result.json"
LOGITS = "logits.pt"
NOISE_SEED = 10_000  # label-noise draws use seed NOISE_SEED + run seed


def run_config(params: dict[str, Any], job: Job) -> dict[str, Any]:
    """What decides one run's numbers: the data split, model, optimiser, loss, seed, noise, views,
    the trainer block. Machine knobs and the other losses' settings are left out."""
    cfg = params["fmnist"]
    loss, seed, noise = job
    data = {k: cfg[k] for k in ("split_seed", "cal_size", "train_size", "val_size", "test_size")}
    if noise == 0:
        data |= {"ood": cfg["ood"], "views": cfg["ca_views"]}
    return {
        "study": "fmnist",
        "data": data,
        "model": cfg["model"],
        "optim": cfg["optim"],
        "loss": cfg["losses"][loss],
        "seed": seed,
        "noise": noise,
        "trainer": params["trainer"],
        "n_bins": cfg["n_bins"],
    }


def run_data(job: Job, roots: tuple[str, str]) -> list[str]:
    """The input directories a run reads (FMNIST-C only for the clean-label runs)."""
    return [roots[0]] if job[2] > 0 else list(roots)


def _run_sets(job: Job, sets: dict[str, Any]) -> tuple[tuple[Any, Any], dict[str, Any]]:
    """((images, labels) to train on, {name: (images, labels)} to evaluate) of a run: the
    noise runs get their noisy labels."""
    loss, seed, noise = job
    train = sets["train"]
    evals = {"cal": sets["cal"], "test": sets["test"]}
    if noise > 0:  # one noisy distribution: training, calibration and test labels alike
        g = torch.Generator().manual_seed(NOISE_SEED + seed)
        train = (train[0], symmetric_noise(train[1], noise, g))
        evals = {k: (x, symmetric_noise(y, noise, g)) for k, (x, y) in evals.items()}
    else:
        evals |= {k: v for k, v in sets.items() if k.startswith("c")}
    return train, evals


def train_one(job: Job, params: dict[str, Any], sets: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train one run, save its weights and evaluation logits under ``out``; return its record
    (per-epoch history, the fit of the training labels, test accuracy)."""
    cfg = params["fmnist"]
    loss, seed, noise = job
    (x, y), evals = _run_sets(job, sets)
    seed_everything(seed)
    module = LossClassifier(
        build_net(cfg["model"], N_CLASSES),
        cfg["losses"][loss],
        lr=cfg["optim"]["lr"],
        n_classes=N_CLASSES,
        n_bins=cfg["n_bins"],
    )
    order = torch.Generator().manual_seed(seed)
    bs = cfg["optim"]["batch_size"]
    train_loader = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, generator=order)
    cal_x, cal_y = evals["cal"]
    val = cfg["val_size"]
    val_loader = DataLoader(TensorDataset(cal_x[:val], cal_y[:val]), batch_size=1000)
    trainer = build_trainer(
        params["trainer"],
        out,
        logger=False,
        checkpoint=False,
        name=out.name,
        max_epochs=cfg["optim"]["epochs"],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_loader, val_loader)
    module.eval()
    device = module.device

    def model(batch: torch.Tensor) -> torch.Tensor:
        return module(batch.to(device)).float().cpu()

    views = tuple(cfg["ca_views"]) if noise == 0 else ("identity",)
    logits = {
        name: {"views": make_views(model, xs, views), "labels": ys}  # (V, N, C), (N,)
        for name, (xs, ys) in evals.items()
    }
    train_logits = make_views(model, x, ("identity",))[0].double()  # (N, C)
    if is_global_zero():
        atomic_save_torch(module.net.state_dict(), out / "model.pt")
        atomic_save_torch({"views": views, "sets": logits}, out / LOGITS)
    test = logits["test"]
    return {
        "history": [{"epoch": e + 1, **v} for e, v in sorted(module.history.items())],
        "train_acc": float(train_logits.argmax(1).eq(y).double().mean()),
        "train_nll": float(torch.nn.functional.cross_entropy(train_logits, y)),
        "test_acc": float(test["views"][0].argmax(1).eq(test["labels"]).double().mean()),
    }


def cost(cfg: dict[str, Any], job: Job) -> int:
    """Forwards per training step: ranking losses add their mixup copies to the batch."""
    spec = cfg["losses"][job[0]]
    ranking = "mixed_logits" in inspect.signature(get_loss(spec["fn"])).parameters
    return 1 + spec.get("n_mixups", 1) if ranking else 1


def _init(params: dict[str, Any], roots: tuple[str, str], need_c: bool) -> dict[str, Any]:
    sets = load_splits(params["fmnist"], roots[0], roots[1] if need_c else None)
    return {"params": params, "roots": roots, "sets": sets}


def _run(job: Job, state: dict[str, Any]) -> tuple[Job, dict[str, Any]]:
    params, roots = state["params"], state["roots"]
    out = fmnist_dir(params) / run_name(*job)
    record = cached_run(
        out / RESULT,
        run_config(params, job),
        lambda: train_one(job, params, state["sets"], out),
        run_data(job, roots),
    )
    return job, record


def main(argv: list[str] | None = None) -> None:
    parser = entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)
    parser.add_argument("--fmnist-root", default=FMNIST_ROOT, help="processed Fashion-MNIST")
    parser.add_argument("--fmnist-c-root", default=FMNIST_C_ROOT, help="Fashion-MNIST-C")
    args, params, mach = parse_entry(parser, argv)
    roots = (args.fmnist_root, args.fmnist_c_root)
    todo, progress = [], RunProgress(len(jobs(params["fmnist"])), "fmnist-train")
    for job in jobs(params["fmnist"]):
        out = fmnist_dir(params) / run_name(*job)
        stored = load_cached(
            out / RESULT, run_config(params, job), run_data(job, roots), requires=[out / LOGITS]
        )
        if stored is None:
            if is_global_zero():  # logits gone or stale: recompute
                (out / RESULT).unlink(missing_ok=True)
            todo.append(job)
        else:
            progress.update(run_name(*job), f"test acc {stored['test_acc']:.4f}", cached=True)
    if not todo:
        return
    todo.sort(key=lambda job: -cost(params["fmnist"], job))  # costliest first: better packing
    need_c = any(noise == 0 for _, _, noise in todo)
    workers = check_pool(mach.workers, params["trainer"])
    for job, record in imap_processes(
        _run, todo, init=_init, init_args=(params, roots, need_c), workers=workers,
        threads=mach.threads,
    ):  # fmt: skip
        detail = f"train acc {record['train_acc']:.4f} test acc {record['test_acc']:.4f}"
        progress.update(run_name(*job), detail, cached=record["cached"])


if __name__ == "__main__":
    main()
