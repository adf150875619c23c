"""Stage kd-image-offline: the student alone and offline KD with each registered divergence.

For every (method, seed) of ``image.offline`` a student is trained from the same seeded
initialisation and batch order (paired comparison across methods) against the frozen
teacher's precomputed logits (stage kd-image-teacher) and evaluated on the test set: top-1,
ECE (15 bins), NLL and top-1 agreement with the teacher. Each run is stored in
``<outputs>/offline/<method>_seed<k>.json`` and skipped on rerun when its config (params, code
and teacher digests) is unchanged, so a killed stage resumes. ``<results>/offline.json`` has
every run and the mean / std per method.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from core.utils.io import atomic_write_json
from core.utils.parallel import imap_processes
from core.utils.runs import cached_run
from projects.kd.common import (
    CODE,
    DEFAULT_FMNIST,
    DEFAULT_PARAMS,
    DualHead,
    build_net,
    classification_metrics,
    file_digest,
    fit_offline,
    load_data,
    load_params,
    n_params,
    predict,
    resolve_terms,
    summarise,
)

BASELINE = "ce"  # the method name of the student trained alone


def resolve_method(method: dict[str, Any], temperature: float) -> dict[str, Any]:
    """A method of ``image.offline`` with every term's temperature and weight filled in."""
    terms = resolve_terms(method.get("terms", []), temperature)
    aux = any(t.get("head", "main") == "aux" for t in terms)
    return {"ce_weight": method.get("ce_weight", 1.0), "aux_head": aux, "terms": terms}


def jobs(cfg: dict[str, Any]) -> list[tuple[str, int]]:
    """(method, seed) of every run; methods with more terms first (better pool packing)."""
    runs = [(m, s) for m in cfg["offline"] for s in cfg["seeds"]]
    return sorted(runs, key=lambda j: -len(cfg["offline"][j[0]].get("terms", [])))


def _init(params_path: str, fmnist_root: str) -> dict[str, Any]:
    params = load_params(params_path)
    cfg = params["image"]
    teacher_path = Path(cfg["paths"]["outputs"]) / "teacher.pt"
    teacher = torch.load(teacher_path, weights_only=True)
    return {
        "cfg": cfg,
        "data": load_data(cfg["data"], fmnist_root),
        "teacher_train": teacher["train_logits"],
        "teacher_test_pred": teacher["test_logits"].argmax(-1),
        "digest": {
            "code": file_digest([*CODE, "projects/kd/image_offline.py"]),
            "teacher": file_digest([teacher_path.resolve()]),
        },
    }


def run_job(job: tuple[str, int], state: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one (method, seed); the cached result when its config is unchanged."""
    name, seed = job
    cfg, data = state["cfg"], state["data"]
    method = resolve_method(cfg["offline"][name], cfg["temperature"])
    config = {
        "method": name,
        "seed": seed,
        "loss": method,
        "student": cfg["student"],
        "optim": cfg["optim"],
        "data": cfg["data"],
        "n_bins": cfg["n_bins"],
        "digest": state["digest"],
    }

    def train() -> dict[str, Any]:
        torch.manual_seed(seed)
        model = build_net(cfg["student"])
        if method["aux_head"]:
            model = DualHead(model)
        teacher = state["teacher_train"] if method["terms"] else None
        fit_offline(model, data["x_train"], data["y_train"], method, cfg["optim"], seed, teacher)
        logits = predict(model, data["x_test"])  # main head only
        metrics = classification_metrics(logits, data["y_test"], cfg["n_bins"])
        metrics["agreement"] = float(
            logits.argmax(-1).eq(state["teacher_test_pred"]).float().mean()
        )
        return {"metrics": metrics, "n_params": n_params(model)}

    path = Path(cfg["paths"]["outputs"]) / "offline" / f"{name}_seed{seed}.json"
    return {"method": name, "seed": seed, **cached_run(path, config, train)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    parser.add_argument("--fmnist-root", default=str(DEFAULT_FMNIST))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = params["image"]
    if BASELINE not in cfg["offline"]:
        raise ValueError(f"image.offline needs the baseline method {BASELINE!r}")
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
        m = r["metrics"]
        tag = "cached" if r["cached"] else f"{r['wall_s']:.0f} s"
        print(
            f"[{len(runs) + 1}/{len(todo)}] {r['method']} seed {r['seed']}: acc {m['accuracy']:.4f} "
            f"ece {m['ece']:.4f} nll {m['nll']:.4f} ({tag})",
            flush=True,
        )
        runs.append({k: r[k] for k in ("method", "seed", "metrics", "n_params", "wall_s", "cpu_s")})
    order = {name: i for i, name in enumerate(cfg["offline"])}
    runs.sort(key=lambda r: (order[r["method"]], r["seed"]))
    result = {
        "student": cfg["student"],
        "summary": summarise(runs),
        "runs": runs,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(Path(cfg["paths"]["results"]) / "offline.json", result)
    print(f"offline stage: {result['wall_s']} s", flush=True)
    return result


if __name__ == "__main__":
    main()
