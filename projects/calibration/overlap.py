"""Stage calibration-overlap: ERM vs mixup, each with and without TS, on overlapping Gaussians.

Chidambaram & Ge 2024, "On the Limitations of Temperature Scaling for Distributions with
Overlaps" (ICLR, arXiv 2306.00740), synthetic experiment: class 0 ~ N(0, I), class 1 ~
N(mean * 1, I) in R^dim; the smaller the mean, the larger the overlap. For every mean, data draw
and method an MLP is trained (``classifier.LossClassifier``; Lightning Fabric, since the
Trainer's per-step hooks cost several times this step: README, "Engine"), temperature scaling is
fitted on a held-out part of the training split (ours, and as the authors' code fits it:
``crosscheck.py``), and test accuracy, NLL, ECE and ACE (top-label, equal-mass bins) are
scored with and without TS. Runs are reused under their run
identity. Writes ``<results>/overlap/runs.json`` (per run) and ``curves.csv`` (training loss of
the first draw).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from core.calibration import (
    TemperatureScaling,
    adaptive_calibration_error,
    expected_calibration_error,
)
from core.engine.cache import cached_run
from core.engine.config import entry_parser, parse_entry
from core.engine.dist import check_pool, is_global_zero
from core.engine.progress import RunProgress
from core.engine.trainer import build_fabric, seed_everything
from core.utils.io import atomic_write_json, atomic_write_text
from core.utils.parallel import imap_processes
from projects.calibration.classifier import LossClassifier, mlp
from projects.calibration.crosscheck import authors_temperature

DEFAULT_PARAMS = "projects/calibration/params.yaml"
Job = tuple[int, float, int, str]  # (mean index, mean, draw, method)


def make_data(mean: float, dim: int, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n points, half per class: x ~ N(y * mean * 1, I) in R^dim. Returns x (n, dim), y (n,)."""
    y = torch.arange(n) % 2
    x = torch.randn(n, dim, generator=generator) + mean * y[:, None].float()
    perm = torch.randperm(n, generator=generator)
    return x[perm], y[perm]


def split(n: int, test_fraction: float, ts_fraction: float, generator: torch.Generator):
    """Index sets (train, ts, test): test_fraction of all for test, ts_fraction of the rest for TS."""
    perm = torch.randperm(n, generator=generator)
    n_test = round(n * test_fraction)
    test, rest = perm[:n_test], perm[n_test:]
    n_ts = round(len(rest) * ts_fraction)
    return rest[n_ts:], rest[:n_ts], test


def evaluate(logits: Tensor, labels: Tensor, n_bins: int) -> dict[str, float]:
    """Accuracy, NLL (from logits, float64), ECE and ACE (equal-mass bins) of logits (N, C)."""
    logits = logits.double()
    probs = logits.softmax(dim=1)
    return {
        "accuracy": float(logits.argmax(1).eq(labels).double().mean()),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": float(expected_calibration_error(probs, labels, n_bins)),
        "ace": float(adaptive_calibration_error(probs, labels, n_bins)),
    }


def fit_fabric(
    module: LossClassifier, loader: DataLoader, epochs: int, trainer_cfg: Mapping[str, Any]
) -> LossClassifier:
    """Train ``module`` for ``epochs`` epochs of ``loader`` with a Fabric from the ``trainer:``
    block, calling its own ``training_step``; returns it in eval mode on the Fabric's device.
    Several devices: the first call launches the ranks, which then train each run together."""
    fabric = build_fabric(trainer_cfg)
    if fabric.world_size > 1:
        fabric.launch()  # a no-op in a launched rank and on later calls
    wrapped, opt = fabric.setup(module, module.configure_optimizers())
    loader = fabric.setup_dataloaders(loader)
    for epoch in range(epochs):
        wrapped.train()
        for i, batch in enumerate(loader):
            loss = wrapped.training_step(batch, i)
            opt.zero_grad(set_to_none=True)
            fabric.backward(loss)
            opt.step()
        module.end_epoch(epoch)
    return module.eval()


def run_config(params: Mapping[str, Any], job: Job) -> dict[str, Any]:
    """What decides one run: the overlap block without the other methods, the draw, the method,
    the trainer block."""
    cfg = params["overlap"]
    i, mean, r, method = job
    block = {k: v for k, v in cfg.items() if k not in ("losses", "runs")}
    return {
        "study": "overlap",
        **block,
        "mean": mean,
        "draw_seed": cfg["seed"] + 1000 * i + r,
        "loss": cfg["losses"][method],
        "trainer": params["trainer"],
    }


def train_one(job: Job, params: Mapping[str, Any]) -> dict[str, Any]:
    """One data draw and method: {raw: metrics, ts: metrics, temperature, history}."""
    cfg = params["overlap"]
    i, mean, r, method = job
    seed = cfg["seed"] + 1000 * i + r
    g = torch.Generator().manual_seed(seed)
    d = cfg["data"]
    x, y = make_data(mean, d["dim"], d["n"], g)
    tr, ts, te = split(d["n"], d["test_fraction"], d["ts_fraction"], g)
    seed_everything(seed)
    module = LossClassifier(
        mlp(d["dim"], cfg["model"]["hidden"], 2),
        cfg["losses"][method],
        lr=cfg["optim"]["lr"],
        n_classes=2,
        n_bins=cfg["n_bins"],
    )
    order = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(x[tr], y[tr]),
        batch_size=cfg["optim"]["batch_size"],
        shuffle=True,
        generator=order,
    )
    module = fit_fabric(module, loader, cfg["optim"]["epochs"], params["trainer"])
    with torch.no_grad():
        ts_logits = module(x[ts].to(module.device)).double().cpu()
        test_logits = module(x[te].to(module.device)).double().cpu()
    scaler = TemperatureScaling().fit(ts_logits, y[ts])
    with torch.no_grad():
        scaled = scaler(test_logits)
    t_authors = authors_temperature(ts_logits, y[ts])
    return {
        "raw": evaluate(test_logits, y[te], cfg["n_bins"]),
        "ts": evaluate(scaled, y[te], cfg["n_bins"]),
        "temperature": float(scaler.temperature),
        "ts_authors": evaluate(test_logits / t_authors, y[te], cfg["n_bins"]),
        "temperature_authors": t_authors,
        "history": [{"epoch": e + 1, **v} for e, v in sorted(module.history.items())],
    }


def jobs(params: Mapping[str, Any]) -> list[Job]:
    cfg = params["overlap"]
    return [
        (i, float(mean), r, method)
        for i, mean in enumerate(cfg["data"]["means"])
        for r in range(cfg["runs"])
        for method in cfg["losses"]
    ]


def _run(job: Job, state: dict[str, Any]) -> tuple[Job, dict[str, Any]]:
    params = state["params"]
    path = state["runs_dir"] / f"mean{job[1]:g}_draw{job[2]}_{job[3]}.json"
    return job, cached_run(path, run_config(params, job), lambda: train_one(job, params))


def _init(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"params": params, "runs_dir": Path(params["paths"]["runs"]) / "overlap"}


def curves_csv(records: dict[Job, dict[str, Any]]) -> str:
    """Training loss per epoch of the first draw: columns epoch, <method>_m<mean> (0.05 ->
    0_05: a dot would read as a nested field in DVC's plot templates)."""
    cols = {
        f"{m}_m{mean:g}".replace(".", "_"): rec
        for (_, mean, r, m), rec in sorted(records.items())
        if r == 0
    }
    epochs = max(len(r["history"]) for r in cols.values())
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["epoch", *cols])
    for e in range(epochs):
        writer.writerow([e + 1, *(f"{r['history'][e]['train_loss']:.6g}" for r in cols.values())])
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)
    args, params, mach = parse_entry(parser, argv)
    todo = jobs(params)
    workers = check_pool(mach.workers, params["trainer"])
    progress = RunProgress(len(todo), "overlap")
    records: dict[Job, dict[str, Any]] = {}
    for job, record in imap_processes(
        _run, todo, init=_init, init_args=(params,), workers=workers, threads=mach.threads
    ):
        records[job] = record
        i, mean, r, method = job
        detail = f"ECE {100 * record['raw']['ece']:.2f} -> TS {100 * record['ts']['ece']:.2f} %"
        progress.update(f"mean {mean:g} draw {r} {method}", detail, cached=record["cached"])
    out = Path(params["paths"]["results"]) / "overlap"
    per_run: dict[str, dict[str, list[dict[str, float]]]] = {}
    for (_, mean, _, method), rec in sorted(records.items()):
        by_method = per_run.setdefault(f"{mean:g}", {})
        by_method.setdefault(method, []).append(rec["raw"])
        by_method.setdefault(f"{method}+ts", []).append(rec["ts"] | {"T": rec["temperature"]})
        by_method.setdefault(f"{method}+ts_authors", []).append(
            rec["ts_authors"] | {"T": rec["temperature_authors"]}
        )
    if not is_global_zero():
        return
    atomic_write_json(out / "runs.json", per_run)
    atomic_write_text(out / "curves.csv", curves_csv(records))


if __name__ == "__main__":
    main()
