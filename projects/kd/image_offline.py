"""Stage kd-image-offline: the student alone and offline KD with each registered divergence.

For every (method, seed) of ``image.offline`` x ``image.seeds`` a student is trained on the
student's subset from the seed's initialisation and batch order (the same for every method of a
seed: paired comparisons) against the frozen teacher's precomputed logits (stage
kd-image-teacher), then tested: top-1, ECE, NLL, top-1 agreement with the teacher. Each run is
cached in ``<outputs>/offline/<method>_seed<k>.json`` under its run identity (config, imported
code, the data and ``teacher.pt``), so a killed stage resumes and a rerun recomputes only what
changed. ``<results>/offline.json`` has every run (the report summarises them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from core.engine.cache import cached_run
from core.engine.config import entry_parser, parse_entry
from core.engine.dist import check_pool, is_global_zero, world_size
from core.engine.identity import run_config
from core.engine.progress import RunProgress
from core.engine.trainer import seed_everything
from core.utils.io import atomic_write_json
from core.utils.parallel import imap_processes
from projects.kd import DEFAULT_PARAMS
from projects.kd.image_data import DEFAULT_FMNIST, batch_indices, eval_loader, load_data, loader
from projects.kd.image_losses import resolve_offline
from projects.kd.image_modules import OfflineKD, build_net, n_params, train_and_test

BASELINE = "ce"  # the method name of the student trained alone


def jobs(cfg: dict[str, Any]) -> list[tuple[str, int]]:
    """(method, seed) of every run; methods with more terms first (better pool packing)."""
    runs = [(m, s) for m in cfg["offline"] for s in cfg["seeds"]]
    return sorted(runs, key=lambda j: -len(cfg["offline"][j[0]].get("terms", [])))


def run_identity(params: dict[str, Any], name: str, seed: int) -> dict[str, Any]:
    """The config of run (``name``, ``seed``): everything that decides its numbers."""
    cfg = params["image"]
    return run_config(
        {
            "method": name,
            "seed": seed,
            "loss": resolve_offline(cfg["offline"][name], cfg["temperature"]),
            "student": cfg["student"],
            "optim": cfg["optim"],
            "data": cfg["data"],
            "n_bins": cfg["n_bins"],
            "trainer": params["trainer"],
        }
    )


def _init(params: dict[str, Any], fmnist_root: str) -> dict[str, Any]:
    cfg = params["image"]
    teacher_path = Path(cfg["paths"]["outputs"]) / "teacher.pt"
    teacher = torch.load(teacher_path, weights_only=True)
    if teacher.get("data") != cfg["data"]:
        raise ValueError(
            f"{teacher_path} holds logits for image.data {teacher.get('data')}, not "
            f"{cfg['data']}: rerun stage kd-image-teacher with these params"
        )
    return {
        "params": params,
        "data": load_data(cfg["data"], fmnist_root),
        "teacher_train": teacher["train_logits"],
        "teacher_test_pred": teacher["test_logits"].argmax(-1),
        "inputs": [fmnist_root, str(teacher_path)],
    }


def run_job(job: tuple[str, int], state: dict[str, Any]) -> dict[str, Any]:
    """Train and test one (method, seed); the cached result when its identity holds."""
    name, seed = job
    params, data = state["params"], state["data"]
    cfg = params["image"]
    config = run_identity(params, name, seed)
    method, optim = config["loss"], cfg["optim"]

    def train() -> dict[str, Any]:
        steps = batch_indices(len(data["x_train"]), optim["batch_size"], optim["epochs"], seed)
        seed_everything(seed)
        module = OfflineKD(build_net(cfg["student"]), method, optim, len(steps), cfg["n_bins"])
        world = world_size(params["trainer"])
        train = loader([data["x_train"], data["y_train"], state["teacher_train"]], steps, world)
        test = eval_loader(
            [data["x_test"], data["y_test"], state["teacher_test_pred"]], world=world
        )
        out = Path(cfg["paths"]["outputs"]) / "offline"
        train_and_test(module, params["trainer"], out, train, test, name=f"{name} seed {seed}")
        return {"metrics": module.results, "n_params": n_params(module.net)}

    path = Path(cfg["paths"]["outputs"]) / "offline" / f"{name}_seed{seed}.json"
    return {"method": name, "seed": seed, **cached_run(path, config, train, state["inputs"])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)
    parser.add_argument("--fmnist-root", default=str(DEFAULT_FMNIST), help="processed data dir")
    args, params, mach = parse_entry(parser, argv)
    cfg = params["image"]
    if BASELINE not in cfg["offline"]:
        raise ValueError(f"image.offline needs the baseline method {BASELINE!r}")
    start = time.perf_counter()
    todo = jobs(cfg)
    progress = RunProgress(len(todo), "kd-image-offline")
    runs = []
    for r in imap_processes(
        run_job,
        todo,
        init=_init,
        init_args=(params, args.fmnist_root),
        workers=check_pool(mach.workers, params["trainer"], "kd-image-offline trainer"),
        threads=mach.threads,
    ):
        m = r["metrics"]
        progress.update(
            f"{r['method']} seed {r['seed']}",
            f"acc {m['accuracy']:.4f} ece {m['ece']:.4f} nll {m['nll']:.4f}",
            cached=r["cached"],
        )
        runs.append(
            {
                k: r[k]
                for k in ("method", "seed", "metrics", "n_params", "wall_s", "cpu_s", "cached")
            }
        )
    order = {name: i for i, name in enumerate(cfg["offline"])}
    runs.sort(key=lambda r: (order[r["method"]], r["seed"]))
    result = {
        "student": cfg["student"],
        "runs": runs,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    saved = [{k: v for k, v in r.items() if k != "cached"} for r in runs]
    if is_global_zero():  # every rank trained each run; one writes
        atomic_write_json(Path(cfg["paths"]["results"]) / "offline.json", result | {"runs": saved})
    print(f"kd-image-offline: {result['wall_s']} s", flush=True)
    return result


if __name__ == "__main__":
    main()
