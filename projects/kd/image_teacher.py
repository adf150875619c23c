"""Stage kd-image-teacher: train the Fashion-MNIST teacher to convergence; save it and its logits.

The teacher learns from ``image.data.teacher_size`` images with CE (``image.teacher_optim``),
trained by ``core.engine.trainer.fit`` in ``<outputs>/teacher`` (checkpoint, DVCLive curves,
run identity: a rerun with the same config, data and code reuses the finished run). Its logits
on the student's subset and on the test set go to ``<outputs>/teacher.pt`` (computed once in
eval mode: no augmentation, so a frozen teacher's soft targets never change); its test metrics
to ``<results>/teacher.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from core.engine.config import entry_parser, parse_entry
from core.engine.dist import is_global_zero, world_size
from core.engine.identity import run_config
from core.engine.trainer import Run, fit, seed_everything
from core.utils.io import atomic_save_torch, atomic_write_json
from projects.kd import DEFAULT_PARAMS
from projects.kd.image_data import (
    DEFAULT_FMNIST,
    batch_indices,
    eval_loader,
    load_data,
    loader,
)
from projects.kd.image_modules import OfflineKD, build_net, n_params


def teacher_config(params: dict[str, Any]) -> dict[str, Any]:
    """What decides the teacher's weights: its net, optimiser, data, seed and trainer block."""
    cfg = params["image"]
    return run_config(
        {
            "seed": params["seed"],
            "net": cfg["teacher"],
            "optim": cfg["teacher_optim"],
            "data": cfg["data"],
            "n_bins": cfg["n_bins"],
            "trainer": params["trainer"],
        }
    )


def predict(trainer: L.Trainer, module: OfflineKD, x: torch.Tensor, world: int) -> torch.Tensor:
    """Logits ``(N, C)`` of every row of ``x`` (N, 1, 28, 28), on every rank: over several
    ranks (identical weights after DDP) each runs the whole set itself, since Lightning's
    predict would leave each rank its own shard."""
    if world == 1:
        return torch.cat(trainer.predict(module, eval_loader([x])))
    module.eval()
    with torch.no_grad():
        return torch.cat([module(b.to(module.device)).cpu() for (b,) in eval_loader([x])])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)
    parser.add_argument("--fmnist-root", default=str(DEFAULT_FMNIST), help="processed data dir")
    args, params, mach = parse_entry(parser, argv)
    torch.set_num_threads(mach.threads)
    cfg = params["image"]
    data = load_data(cfg["data"], args.fmnist_root)
    optim = cfg["teacher_optim"]
    x, y = data["x_teacher"], data["y_teacher"]
    steps = batch_indices(len(x), optim["batch_size"], optim["epochs"], params["seed"])
    per_epoch = len(steps) // optim["epochs"]
    start, cpu = time.perf_counter(), time.process_time()
    seed_everything(params["seed"])
    net = build_net(cfg["teacher"])
    module = OfflineKD(net, {"ce_weight": 1.0, "terms": []}, optim, len(steps), cfg["n_bins"])
    out = Path(cfg["paths"]["outputs"])
    run = Run(out / "teacher", teacher_config(params), [args.fmnist_root], name="teacher")
    world = world_size(params["trainer"])
    test = eval_loader([data["x_test"], data["y_test"]], world=world)
    trainer = fit(
        module,
        params["trainer"],
        run,
        train_dataloaders=loader([x, y, torch.zeros(len(y), 0)], steps, world),
        val_dataloaders=test,
        max_epochs=1,  # one Lightning epoch = every data epoch's seeded batches
        val_check_interval=per_epoch,  # a validation point per data epoch
        log_every_n_steps=max(per_epoch // 4, 1),
        num_sanity_val_steps=0,
    )
    train_logits = predict(trainer, module, data["x_train"], world)  # (N, C)
    test_logits = predict(trainer, module, data["x_test"], world)  # (Nt, C)
    test = eval_loader([data["x_test"], data["y_test"], test_logits.argmax(-1)], world=world)
    trainer.test(module, test, verbose=False)
    if is_global_zero():  # every rank trained and predicted; one writes
        atomic_save_torch(
            {
                "state_dict": net.state_dict(),
                "train_logits": train_logits.cpu(),
                "test_logits": test_logits.cpu(),
                "data": cfg["data"],  # the subsets these logits belong to
            },
            out / "teacher.pt",
        )
    result = {
        "net": cfg["teacher"],
        "n_params": n_params(net),
        "seed": params["seed"],
        "train_size": len(x),
        "metrics": {k: v for k, v in module.results.items() if k != "agreement"},
        "student_subset_accuracy": float(
            train_logits.argmax(-1).eq(data["y_train"]).float().mean()
        ),
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
    }
    if is_global_zero():
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
