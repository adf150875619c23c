"""Stage kd-image-teacher: train the Fashion-MNIST teacher once; save it and its logits.

The offline-KD stage reads the teacher's logits on the training subset (computed once in eval
mode: there is no augmentation, so a frozen teacher's soft targets never change) from
``<outputs>/teacher.pt``; its test metrics go to ``<results>/teacher.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from core.utils.io import atomic_save_torch, atomic_write_json
from projects.kd.common import (
    DEFAULT_FMNIST,
    DEFAULT_PARAMS,
    build_net,
    classification_metrics,
    fit_offline,
    load_data,
    load_params,
    n_params,
    predict,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--fmnist-root", default=str(DEFAULT_FMNIST))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = params["image"]
    torch.set_num_threads(params["threads"])
    data = load_data(cfg["data"], args.fmnist_root)
    start, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(params["seed"])
    teacher = build_net(cfg["teacher"])
    fit_offline(teacher, data["x_train"], data["y_train"], {}, cfg["optim"], params["seed"])
    train_logits = predict(teacher, data["x_train"])  # (N_train, C)
    test_logits = predict(teacher, data["x_test"])  # (N_test, C)
    out = Path(cfg["paths"]["outputs"]) / "teacher.pt"
    atomic_save_torch(
        {
            "state_dict": teacher.state_dict(),
            "train_logits": train_logits,
            "test_logits": test_logits,
        },
        out,
    )
    result = {
        "net": cfg["teacher"],
        "n_params": n_params(teacher),
        "seed": params["seed"],
        "metrics": classification_metrics(test_logits, data["y_test"], cfg["n_bins"]),
        "train_accuracy": float(train_logits.argmax(-1).eq(data["y_train"]).float().mean()),
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
    }
    atomic_write_json(Path(cfg["paths"]["results"]) / "teacher.json", result)
    m = result["metrics"]
    print(
        f"teacher {result['n_params']} params: test acc {m['accuracy']:.4f} ece {m['ece']:.4f} "
        f"nll {m['nll']:.4f} ({result['wall_s']} s)",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
