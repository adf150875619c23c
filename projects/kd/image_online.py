"""Stage kd-image-online: online KD, teacher and student trained together from scratch.

Each method of ``image.online.methods`` gives the student's and the teacher's divergence terms
(``common.online_losses``): DML (Zhang et al. 2018, arXiv:1706.00384) is forward KL for the
student and KL(p_s || p_t) for the teacher; BD-KD (Amara et al. 2022, arXiv:2212.12965)
replaces the student's term by the entropy-gap-balanced forward/reverse KL (``bdkd``) and keeps
the reverse-KL peer term for the teacher. Student and teacher start from the same seeded
initialisations as the student alone (stage kd-image-offline, method ``ce``) and the teacher
alone (stage kd-image-teacher) and see the same batches. Runs are cached per (method, seed) in
``<outputs>/online/``; ``<results>/online.json`` has every run and mean / std per method.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.utils.io import atomic_write_json
from core.utils.parallel import imap_processes
from core.utils.runs import cached_run
from projects.kd.common import (
    CODE,
    DEFAULT_FMNIST,
    DEFAULT_PARAMS,
    batches,
    build_net,
    classification_metrics,
    file_digest,
    load_data,
    load_params,
    make_optimizer,
    online_losses,
    predict,
    resolve_terms,
    summarise,
)


def resolve_method(method: dict[str, Any], temperature: float) -> dict[str, Any]:
    """An online method with every term's temperature and weight filled in."""
    return {side: resolve_terms(method[side], temperature) for side in ("student", "teacher")}


def fit_online(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    method: dict[str, Any],
    optim: dict[str, Any],
    seed: int,
) -> None:
    """Train both networks on images x (N, 1, 28, 28), labels y (N,), one optimiser each;
    ``online_losses`` detaches the other network in each loss, so one backward of the sum
    gives each network exactly its own loss's gradient."""
    steps = batches(len(x), optim, seed)
    opt_s, sched_s = make_optimizer(student.parameters(), optim, len(steps))
    opt_t, sched_t = make_optimizer(teacher.parameters(), optim, len(steps))
    student.train()
    teacher.train()
    for i, idx in enumerate(steps):
        xb = x[idx]
        loss_s, loss_t = online_losses(
            method, student(xb), teacher(xb), y[idx], (i + 1) / len(steps)
        )
        opt_s.zero_grad(set_to_none=True)
        opt_t.zero_grad(set_to_none=True)
        (loss_s + loss_t).backward()
        for opt, sched in ((opt_s, sched_s), (opt_t, sched_t)):
            opt.step()
            sched.step()
    student.eval()
    teacher.eval()


def jobs(cfg: dict[str, Any]) -> list[tuple[str, int]]:
    return [(m, s) for m in cfg["online"]["methods"] for s in cfg["seeds"]]


def _init(params_path: str, fmnist_root: str) -> dict[str, Any]:
    cfg = load_params(params_path)["image"]
    return {
        "cfg": cfg,
        "data": load_data(cfg["data"], fmnist_root),
        "digest": file_digest([*CODE, "projects/kd/image_online.py"]),
    }


def run_job(job: tuple[str, int], state: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one (method, seed); the cached result when its config is unchanged."""
    name, seed = job
    cfg, data = state["cfg"], state["data"]
    method = resolve_method(cfg["online"]["methods"][name], cfg["online"]["temperature"])
    config = {
        "method": name,
        "seed": seed,
        "loss": method,
        "student": cfg["student"],
        "teacher": cfg["teacher"],
        "optim": cfg["optim"],
        "data": cfg["data"],
        "n_bins": cfg["n_bins"],
        "digest": state["digest"],
    }

    def train() -> dict[str, Any]:
        torch.manual_seed(seed)
        student = build_net(cfg["student"])
        torch.manual_seed(seed)
        teacher = build_net(cfg["teacher"])
        fit_online(student, teacher, data["x_train"], data["y_train"], method, cfg["optim"], seed)
        s_logits, t_logits = predict(student, data["x_test"]), predict(teacher, data["x_test"])
        metrics = classification_metrics(s_logits, data["y_test"], cfg["n_bins"])
        metrics["agreement"] = float(s_logits.argmax(-1).eq(t_logits.argmax(-1)).float().mean())
        return {
            "metrics": metrics,
            "teacher_metrics": classification_metrics(t_logits, data["y_test"], cfg["n_bins"]),
        }

    path = Path(cfg["paths"]["outputs"]) / "online" / f"{name}_seed{seed}.json"
    return {"method": name, "seed": seed, **cached_run(path, config, train)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--fmnist-root", default=str(DEFAULT_FMNIST))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = params["image"]
    start = time.perf_counter()
    runs = []
    todo = jobs(cfg)
    for r in imap_processes(
        run_job,
        todo,
        init=_init,
        init_args=(args.params, args.fmnist_root),
        workers=cfg["workers"],
        threads=params["threads"],
    ):
        m, t = r["metrics"], r["teacher_metrics"]
        tag = "cached" if r["cached"] else f"{r['wall_s']:.0f} s"
        print(
            f"[{len(runs) + 1}/{len(todo)}] {r['method']} seed {r['seed']}: student acc "
            f"{m['accuracy']:.4f} ece {m['ece']:.4f}; teacher acc {t['accuracy']:.4f} ({tag})",
            flush=True,
        )
        keys = ("method", "seed", "metrics", "teacher_metrics", "wall_s", "cpu_s")
        runs.append({k: r[k] for k in keys})
    order = {name: i for i, name in enumerate(cfg["online"]["methods"])}
    runs.sort(key=lambda r: (order[r["method"]], r["seed"]))
    teachers = [{"method": r["method"], "metrics": r["teacher_metrics"]} for r in runs]
    result = {
        "student": cfg["student"],
        "teacher": cfg["teacher"],
        "summary": summarise(runs),
        "teacher_summary": summarise(teachers),
        "runs": runs,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(Path(cfg["paths"]["results"]) / "online.json", result)
    print(f"online stage: {result['wall_s']} s", flush=True)
    return result


if __name__ == "__main__":
    main()
