"""Stage robust_losses-train: every (noise condition, seed, loss) run on noisy Fashion-MNIST.

Conditions: clean labels once, then each noise type at each rate of ``noise`` in params. Each
run's result (final clean test accuracy, DSE, DSMI and its per-epoch history) is written
atomically to ``<outputs>/<condition>-<loss>-s<seed>.json`` together with the run's config and
a digest of the code that decides its numbers; a run whose file holds the same config is
skipped, so a killed stage resumes. Runs go to ``workers`` single-threaded processes; the
parent merges them into ``<results>/metrics.json`` and ``<results>/curves.csv``. All losses of
one (condition, seed) see the same noisy labels, initial weights and batch order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from core.data.fashion_mnist import load_fashion_mnist
from core.training import build_trainer, seed_everything
from core.utils.io import atomic_write_json, atomic_write_text
from core.utils.parallel import map_processes
from core.utils.runs import load_cached, store_run
from projects.robust_losses.common import (
    NoisyLabelMLP,
    arg_parser,
    condition_name,
    conditions,
    load_params,
    noisy_labels,
    to_inputs,
)

CURVE_FIELDS = [
    "condition",
    "noise",
    "rate",
    "loss",
    "seed",
    "epoch",
    "test_acc",
    "fit_noisy_train_acc",
    "dse",
    "dsmi_y",
]
FINAL = ("test_acc", "fit_noisy_train_acc", "dse", "dsmi_y")
# code that decides a run's numbers: a change re-runs the run even when its file exists
SOURCES = (
    "projects/robust_losses/common.py",
    "core/losses/classification.py",
    "core/entropy/diffusion.py",
)


def prepare_data(p: dict) -> dict[str, torch.Tensor | np.ndarray]:
    """Clean train subset, test set and the fixed DSE probe set (clean test images)."""
    ds = load_fashion_mnist(p["data"]["root"])
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
        "y_probe": ds.y_test[probe].numpy(),
    }


def run_one(p: dict, data: dict, loss: str, y_noisy: np.ndarray, seed: int) -> list[dict]:
    """Train one model; return its history (epoch 0 = initialisation, then every epoch)."""
    seed_everything(seed)
    y = torch.from_numpy(y_noisy)
    eval_data = {k: data[k] for k in ("x_train", "x_test", "y_test", "x_probe", "y_probe")}
    eval_data["y_train_noisy"] = y
    model = NoisyLabelMLP(
        loss,
        p["losses"][loss] or {},
        p["model"]["hidden"],
        p["optim"]["lr"],
        p["optim"]["weight_decay"],
        eval_data,
        p["probe"],
    )
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(data["x_train"], y),
        batch_size=p["train"]["batch_size"],
        shuffle=True,
        generator=g,
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(p["trainer"], tmp, logger=False, checkpoint=False)
        trainer.fit(model, loader)
    return model.history


def code_digest() -> str:
    """sha256 of the files in ``SOURCES`` (paths relative to the repository root)."""
    h = hashlib.sha256()
    for path in SOURCES:
        h.update(path.encode() + Path(path).read_bytes())
    return h.hexdigest()


def run_config(p: dict, job: tuple[str, float, int, str], code: str) -> dict[str, Any]:
    """Everything that decides one run's numbers: the cache key of its result file."""
    noise, rate, seed, loss = job
    keys = ("data", "model", "optim", "probe")
    return {
        "noise": noise,
        "rate": rate,
        "seed": seed,
        "loss": loss,
        "loss_hp": p["losses"][loss] or {},
        **{k: p[k] for k in keys},
        "batch_size": p["train"]["batch_size"],
        "max_epochs": p["trainer"]["max_epochs"],
        "code": code,
    }


def run_path(out: Path, job: tuple[str, float, int, str]) -> Path:
    noise, rate, seed, loss = job
    return (
        out
        / f"{condition_name(noise, rate).replace(' ', '-').replace('%', '')}-{loss}-s{seed}.json"
    )


_DATA: dict[str, Any] = {}  # per process: the data of the last params seen


def run_job(job: tuple[str, float, int, str], p: dict, code: str) -> dict[str, Any]:
    """One run, or its stored result when the file at :func:`run_path` has the same config."""
    path, config = run_path(Path(p["paths"]["outputs"]), job), run_config(p, job, code)
    stored = load_cached(path, config)
    if stored is not None:
        return stored | {"cached": True}
    key = json.dumps(p["data"], sort_keys=True) + json.dumps(p["probe"], sort_keys=True)
    if _DATA.get("key") != key:
        _DATA.update(key=key, data=prepare_data(p))
    data = _DATA["data"]
    noise, rate, seed, loss = job
    y_noisy = noisy_labels(data["y_train"], noise, rate, seed)
    t0 = time.perf_counter()
    hist = run_one(p, data, loss, y_noisy, seed)
    result = store_run(
        path,
        config,
        {
            "actual_noise": float((y_noisy != data["y_train"]).mean()),
            "seconds": round(time.perf_counter() - t0, 2),
            "history": hist,
        },
    )
    last = hist[-1]
    print(
        f"{condition_name(noise, rate):15s} seed {seed} {loss:8s} test acc "
        f"{last['test_acc']:.4f} DSE {last['dse']:.3f} ({result['seconds']:.1f} s)",
        flush=True,
    )
    return result | {"cached": False}


def main(argv: list[str] | None = None) -> int:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    p = load_params(args.params)
    jobs = [
        (noise, rate, seed, loss)
        for noise, rate in conditions(p["noise"])
        for seed in p["seeds"]
        for loss in p["losses"]
    ]
    t0 = time.perf_counter()
    results = map_processes(
        run_job, jobs, p, code_digest(), workers=p["workers"], threads=p["train"]["num_threads"]
    )
    runs, rows = [], []
    for (noise, rate, seed, loss), r in zip(jobs, results, strict=True):
        hist, cond = r["history"], condition_name(noise, rate)
        runs.append(
            {
                "condition": cond,
                "noise": noise,
                "rate": rate,
                "actual_noise": r["actual_noise"],
                "loss": loss,
                "seed": seed,
                "seconds": r["seconds"],
                "cached": r["cached"],
                **{k: hist[-1][k] for k in FINAL},
                "best_test_acc": max(h["test_acc"] for h in hist[1:]),
            }
        )
        rows += [
            {"condition": cond, "noise": noise, "rate": rate, "loss": loss, "seed": seed, **h}
            for h in hist
        ]
    n_new = sum(not r["cached"] for r in runs)
    print(f"{len(runs)} runs ({n_new} trained) in {time.perf_counter() - t0:.0f} s", flush=True)
    out = Path(p["paths"]["results"])
    atomic_write_json(out / "metrics.json", {"runs": runs})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "curves.csv", buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
