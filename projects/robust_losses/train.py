"""Stage robust_losses-train: every (noise condition, seed, loss) run on noisy Fashion-MNIST.

Conditions: clean labels once, then each noise type at each rate of ``noise`` in params. Every
run trains :class:`NoisyLabelMLP` with the engine's Trainer inside
:func:`core.engine.cache.cached_run`: ``<runs>/<condition>-<loss>-s<seed>.json`` keeps its
per-epoch history under its run identity (the params that decide it, the repository code it
imported, the data), so a killed stage resumes and an edited loss recomputes just its runs. Runs
go to ``machine.workers`` processes; ``<results>/runs.json`` (final and peak accuracy per run)
and ``<results>/curves.csv`` (every epoch) gather them. All losses of one (condition, seed) see
the same noisy labels, initial weights and batch order. Under ``trainer.strategy: ddp`` each
run trains on every rank (``--workers 1``: a pool never nests around the ranks) and evaluates
the full test set on every rank with the synced weights; only global rank 0 writes.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from core.data.fashion_mnist import load_fashion_mnist
from core.engine.cache import cached_run
from core.engine.config import entry_parser, parse_entry
from core.engine.dist import check_pool, is_global_zero
from core.engine.identity import run_config
from core.engine.progress import RunProgress
from core.engine.trainer import EpochLine, build_trainer, seed_everything
from core.utils.io import atomic_write_json, atomic_write_text
from core.utils.parallel import imap_processes
from projects.robust_losses import DEFAULT_PARAMS
from projects.robust_losses.label_noise import (
    condition_key,
    condition_name,
    conditions,
    noisy_labels,
)
from projects.robust_losses.model import NoisyLabelMLP, to_inputs

IDENTITY_KEYS = ("data", "model", "optim", "train", "trainer")  # shared by every run
CURVE_FIELDS = ["condition", "loss", "seed", "epoch", "test_acc", "fit_noisy_train_acc", "dse"]
CURVE_FIELDS += ["dsmi_y"]
Job = tuple[str, float, int, str]  # (noise type, rate, seed, loss)


def prepare_data(p: dict) -> dict[str, Any]:
    """Clean training subset (``data.n_train`` images), the full test set and the DSE probe
    images (a fixed subset of ``probe.n`` test images), as CPU tensors / numpy labels."""
    ds = load_fashion_mnist(p["paths"]["data"])
    rng = np.random.default_rng(p["data"]["subset_seed"])
    idx = torch.from_numpy(rng.permutation(len(ds.y_train))[: p["data"]["n_train"]])
    probe = torch.from_numpy(rng.permutation(len(ds.y_test))[: p["probe"]["n"]])
    x_test = to_inputs(ds.x_test)
    return {
        "x_train": to_inputs(ds.x_train[idx]),
        "y_train": ds.y_train[idx].numpy(),
        "x_test": x_test,
        "y_test": ds.y_test,
        "x_probe": x_test[probe],
        "y_probe": ds.y_test[probe],
    }


def job_config(p: dict, job: Job) -> dict[str, Any]:
    """What decides one run's numbers (its identity's config): the shared blocks, its condition,
    seed and loss (hyperparameters, logit map) and the probe settings where it is probed."""
    noise, rate, seed, loss = job
    cfg = {k: p[k] for k in IDENTITY_KEYS}
    cfg |= {"noise": noise, "rate": rate, "seed": seed, "loss": loss}
    cfg |= {"loss_hp": p["losses"][loss] or {}, "logit_map": p["logit_maps"].get(loss, "identity")}
    if loss in p["probe"]["losses"]:
        cfg["probe"] = {k: p["probe"][k] for k in ("n", "sigma", "t")}
    return run_config(cfg)


def run_path(p: dict, job: Job) -> Path:
    noise, rate, seed, loss = job
    return Path(p["paths"]["runs"]) / f"{condition_key(noise, rate)}-{loss}-s{seed}.json"


def train_run(p: dict, data: dict[str, Any], job: Job) -> dict[str, Any]:
    """Train one model; return the fraction of labels flipped and its history (epoch 0 =
    initialisation, then one row per epoch)."""
    noise, rate, seed, loss = job
    y = torch.from_numpy(noisy_labels(data["y_train"], noise, rate, seed))
    seed_everything(seed)
    probed = loss in p["probe"]["losses"]
    eval_keys = ("x_test", "y_test", "x_train") + (("x_probe", "y_probe") if probed else ())
    model = NoisyLabelMLP(
        loss,
        p["losses"][loss] or {},
        p["model"]["hidden"],
        p["optim"],
        {k: data[k] for k in eval_keys} | {"y_train_noisy": y},
        logit_map=p["logit_maps"].get(loss, "identity"),
        probe=p["probe"] if probed else None,
    )
    loader = DataLoader(
        TensorDataset(data["x_train"], y),
        batch_size=p["train"]["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(p["trainer"], tmp, logger=False, checkpoint=False)
        # one line per run (RunProgress) instead of one per epoch of every run
        trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, EpochLine)]
        trainer.fit(model, loader)
    flipped = float((y.numpy() != data["y_train"]).mean())
    return {"actual_noise": flipped, "history": model.history}


def _init(p: dict) -> dict[str, Any]:
    """Per-process state: params and data. A pool whose initializer raises respawns its
    workers forever, so a failure (e.g. missing data) is handed to the jobs to raise."""
    try:
        return {"p": p, "data": prepare_data(p)}
    except Exception as err:
        return {"p": p, "error": err}


def _job(job: Job, state: dict[str, Any]) -> tuple[Job, dict[str, Any]]:
    """One run, or its stored result while its identity holds (in a worker process)."""
    if "error" in state:
        raise state["error"]
    p = state["p"]
    fn = lambda: train_run(p, state["data"], job)  # noqa: E731
    return job, cached_run(run_path(p, job), job_config(p, job), fn, [p["paths"]["data"]])


def summary(job: Job, record: dict[str, Any]) -> dict[str, Any]:
    """One row of runs.json: the run's condition, final and early-stopping-peak figures."""
    noise, rate, seed, loss = job
    hist = record["history"]
    peak = max(hist[1:], key=lambda h: h["test_acc"])
    last = hist[-1]
    return {
        "condition": condition_key(noise, rate),
        "noise": noise,
        "rate": rate,
        "loss": loss,
        "seed": seed,
        "actual_noise": record["actual_noise"],
        "test_acc": last["test_acc"],
        "peak_test_acc": peak["test_acc"],
        "peak_epoch": peak["epoch"],
        "fit_noisy_train_acc": last["fit_noisy_train_acc"],
        "wall_s": record["wall_s"],
        "cached": record["cached"],
    }


@contextmanager
def _blas_threads(threads: int):
    """Cap OpenBLAS / OpenMP threads of the worker processes spawned inside (numpy's
    eigendecompositions in the DSE ran ~10x slower with 2 BLAS threads per worker on 2 busy
    cores; ``torch.set_num_threads`` does not reach numpy's BLAS)."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    old = {n: os.environ.get(n) for n in names}
    os.environ.update({n: str(threads) for n in names})
    try:
        yield
    finally:
        for n, v in old.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def main(argv: list[str] | None = None) -> int:
    args, p, mach = parse_entry(entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS), argv)
    jobs = [
        (noise, rate, seed, loss)
        for noise, rate in conditions(p["noise"])
        for seed in p["seeds"]
        for loss in p["losses"]
    ]
    workers = check_pool(mach.workers, p["trainer"])
    progress = RunProgress(len(jobs), "robust_losses-train")
    done: dict[Job, dict[str, Any]] = {}
    with _blas_threads(mach.threads):
        for job, record in imap_processes(
            _job, jobs, init=_init, init_args=(p,), workers=workers, threads=mach.threads
        ):
            done[job] = record
            row = summary(job, record)
            progress.update(
                f"{condition_name(*job[:2])} seed {job[2]} {job[3]}",
                f"final {100 * row['test_acc']:.1f} % peak {100 * row['peak_test_acc']:.1f} % "
                f"fit {100 * row['fit_noisy_train_acc']:.1f} % {row['wall_s']:.0f} s",
                cached=record["cached"],
            )
    runs, rows = [], []
    for job in jobs:  # the fixed job order, whatever order the workers finished in
        noise, rate, seed, loss = job
        runs.append(summary(job, done[job]))
        for h in done[job]["history"]:
            rows.append({"condition": condition_key(noise, rate), "loss": loss, "seed": seed})
            rows[-1] |= {k: h.get(k, float("nan")) for k in CURVE_FIELDS[3:]}
    if not is_global_zero():
        return 0
    out = Path(p["paths"]["results"])
    atomic_write_json(out / "runs.json", {"runs": runs})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "curves.csv", buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
