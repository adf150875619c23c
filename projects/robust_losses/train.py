"""Stage robust_losses-train: every (noise type, seed, loss) run on noisy Fashion-MNIST.

Writes ``<results>/metrics.json`` (final clean test accuracy, DSE, DSMI per run) and
``<results>/curves.csv`` (the same per epoch). All losses of one (noise, seed) see the same
noisy labels, initial weights and batch order.
"""

from __future__ import annotations

import csv
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from core.data.fashion_mnist import load_fashion_mnist
from core.training import build_trainer, seed_everything
from core.utils.io import atomic_write_json, atomic_write_text
from projects.robust_losses.common import NOISES, NoisyLabelMLP, arg_parser, load_params, to_inputs

CURVE_FIELDS = [
    "noise",
    "loss",
    "seed",
    "epoch",
    "test_acc",
    "fit_noisy_train_acc",
    "dse",
    "dsmi_y",
]


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
    """Train one model; return its per-epoch history."""
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


def main(argv: list[str] | None = None) -> int:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    p = load_params(args.params)
    torch.set_num_threads(p["train"]["num_threads"])
    data = prepare_data(p)
    runs, rows = [], []
    for noise, rate in p["noise"].items():
        for seed in p["seeds"]:
            y_noisy = NOISES[noise](data["y_train"], rate, np.random.default_rng(1000 + seed))
            actual = float((y_noisy != data["y_train"]).mean())
            for loss in p["losses"]:
                t0 = time.perf_counter()
                hist = run_one(p, data, loss, y_noisy, seed)
                last = hist[-1]
                runs.append(
                    {
                        "noise": noise,
                        "rate": rate,
                        "actual_noise": actual,
                        "loss": loss,
                        "seed": seed,
                        "seconds": time.perf_counter() - t0,
                        **{
                            k: last[k] for k in ("test_acc", "fit_noisy_train_acc", "dse", "dsmi_y")
                        },
                        "best_test_acc": max(h["test_acc"] for h in hist),
                    }
                )
                rows += [{"noise": noise, "loss": loss, "seed": seed, **h} for h in hist]
                print(
                    f"{noise:10s} seed {seed} {loss:8s} test acc {last['test_acc']:.4f} "
                    f"DSE {last['dse']:.3f} ({runs[-1]['seconds']:.1f} s)",
                    flush=True,
                )
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
