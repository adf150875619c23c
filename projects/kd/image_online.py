"""Stage kd-image-online: online KD, teacher and student trained together from scratch.

Each method of ``image.online.methods`` gives the student's and the teacher's divergence terms
(``image_losses.online_losses``): ``alone`` has none (the two networks trained independently,
the baseline), DML (Zhang et al. 2018, arXiv:1706.00384) is forward KL for the student and
KL(p_s || p_t) for the teacher, BD-KD (Amara et al., arXiv:2212.12965) balances forward and
reverse KL per sample. Both networks learn from the student's subset; every method of a seed
starts from the seed's initialisations and sees its batches. Runs are cached per (method, seed)
in ``<outputs>/online/`` under their run identity; ``<results>/online.json`` has every run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

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
from projects.kd.image_losses import resolve_online
from projects.kd.image_modules import OnlineKD, build_net, train_and_test


def jobs(cfg: dict[str, Any]) -> list[tuple[str, int]]:
    return [(m, s) for m in cfg["online"]["methods"] for s in cfg["seeds"]]


def run_identity(params: dict[str, Any], name: str, seed: int) -> dict[str, Any]:
    """The config of online run (``name``, ``seed``): everything that decides its numbers."""
    cfg = params["image"]
    return run_config(
        {
            "method": name,
            "seed": seed,
            "loss": resolve_online(cfg["online"]["methods"][name], cfg["online"]["temperature"]),
            "student": cfg["student"],
            "teacher": cfg["teacher"],
            "optim": cfg["optim"],
            "data": cfg["data"],
            "n_bins": cfg["n_bins"],
            "trainer": params["trainer"],
        }
    )


def _init(params: dict[str, Any], fmnist_root: str) -> dict[str, Any]:
    data = load_data(params["image"]["data"], fmnist_root)
    return {"params": params, "data": data, "inputs": [fmnist_root]}


def run_job(job: tuple[str, int], state: dict[str, Any]) -> dict[str, Any]:
    """Train and test one (method, seed); the cached result when its identity holds."""
    name, seed = job
    params, data = state["params"], state["data"]
    cfg = params["image"]
    config = run_identity(params, name, seed)
    optim = cfg["optim"]

    def train() -> dict[str, Any]:
        steps = batch_indices(len(data["x_train"]), optim["batch_size"], optim["epochs"], seed)
        seed_everything(seed)
        student = build_net(cfg["student"])  # the same init as the offline student of `seed`
        seed_everything(seed)
        teacher = build_net(cfg["teacher"])
        module = OnlineKD(student, teacher, config["loss"], optim, len(steps), cfg["n_bins"])
        out = Path(cfg["paths"]["outputs"]) / "online"
        train_and_test(
            module,
            params["trainer"],
            out,
            loader([data["x_train"], data["y_train"]], steps, world_size(params["trainer"])),
            eval_loader([data["x_test"], data["y_test"]], world=world_size(params["trainer"])),
            name=f"online {name} seed {seed}",
        )
        return module.results

    path = Path(cfg["paths"]["outputs"]) / "online" / f"{name}_seed{seed}.json"
    return {"method": name, "seed": seed, **cached_run(path, config, train, state["inputs"])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)
    parser.add_argument("--fmnist-root", default=str(DEFAULT_FMNIST), help="processed data dir")
    args, params, mach = parse_entry(parser, argv)
    cfg = params["image"]
    start = time.perf_counter()
    todo = jobs(cfg)
    progress = RunProgress(len(todo), "kd-image-online")
    runs = []
    for r in imap_processes(
        run_job,
        todo,
        init=_init,
        init_args=(params, args.fmnist_root),
        workers=check_pool(mach.workers, params["trainer"], "kd-image-online trainer"),
        threads=mach.threads,
    ):
        m, t = r["metrics"], r["teacher_metrics"]
        progress.update(
            f"{r['method']} seed {r['seed']}",
            f"student acc {m['accuracy']:.4f} ece {m['ece']:.4f}; teacher acc {t['accuracy']:.4f}",
            cached=r["cached"],
        )
        keys = ("method", "seed", "metrics", "teacher_metrics", "wall_s", "cpu_s", "cached")
        runs.append({k: r[k] for k in keys})
    order = {name: i for i, name in enumerate(cfg["online"]["methods"])}
    runs.sort(key=lambda r: (order[r["method"]], r["seed"]))
    result = {
        "student": cfg["student"],
        "teacher": cfg["teacher"],
        "runs": runs,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    saved = [{k: v for k, v in r.items() if k != "cached"} for r in runs]
    if is_global_zero():  # every rank trained each run; one writes
        atomic_write_json(Path(cfg["paths"]["results"]) / "online.json", result | {"runs": saved})
    print(f"kd-image-online: {result['wall_s']} s", flush=True)
    return result


if __name__ == "__main__":
    main()
