"""Stage tta-adapt: run every method on every stream (setting) and seed for both norm variants.

A *stream* is a list of batches, each with its corruption and severity per sample and a flag
saying whether the method is reset before it. Streams (``adapt.settings.<name>.stream``):

- ``reset``: corruption by corruption, reset before each (the papers' main protocol);
- ``continual``: the same sequence, never reset (CoTTA / RMT's continual setting);
- ``mixed``: all corruptions' samples shuffled together, never reset (SAR's mixed shifts);
- ``gradual``: per corruption severities 1->5->1, never reset (RMT's gradual setting).

``batch_size: 1`` gives SAR's single-sample setting and ``label_order: sorted | dirichlet``
its online imbalanced label shift (each corruption's samples ordered by label, or in
Dirichlet(alpha)-drawn class proportions per batch). Errors are counted on the samples at
``adapt.severity`` only.

One *run* = (norm, setting, method, seed). Its record ``paths.runs/adapt/<norm>/<setting>/
<method>/seed<k>.json`` is reused while its identity holds (the setting, the method's
hparams, seed, model, the Fabric block, the source checkpoint and corruption files, the
imported code; ``core.engine.cache.cached_run``), so a killed stage resumes and a changed
method or setting recomputes only its runs. Runs go through Lightning Fabric
(``adapt.trainer``: accelerator, devices, precision) in ``machine.workers`` processes, one
progress line each with an ETA. Writes ``paths.results/errors.json`` (per-seed errors).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import MeanMetric

from core.data.fashion_mnist import load_fashion_mnist, to_float_images
from core.data.fashion_mnist_c import load_corruption
from core.engine.cache import cached_run, load_cached
from core.engine.config import entry_parser, parse_entry
from core.engine.dist import check_pool, is_global_zero
from core.engine.identity import run_config
from core.engine.progress import RunProgress
from core.engine.trainer import build_fabric
from core.utils.io import atomic_write_json
from core.utils.parallel import imap_processes
from projects.tta import DEFAULT_PARAMS
from projects.tta.methods import build
from projects.tta.source_model import checkpoint_path, load_source_model

GRADUAL = (1, 2, 3, 4, 5, 4, 3, 2, 1)
STREAMS = ("reset", "continual", "mixed", "gradual")
NEEDS_SOURCE = ("eata", "rmt")  # clean labelled samples: EATA's Fisher, RMT's prototypes/replay
ADAPTING = ("tent", "eata", "sar", "deyo", "rmt")  # methods that draw random numbers (seeded)


@dataclass
class Batch:
    x: torch.Tensor  # (B, 1, 28, 28) float in [0, 1]
    y: torch.Tensor  # (B,)
    corruption: torch.Tensor  # (B,) index into the setting's corruption list
    severity: torch.Tensor  # (B,)
    reset: bool  # reset the method before this batch


def label_order(y: np.ndarray, order: str | None, batch: int, alpha: float, rng) -> np.ndarray:
    """A permutation of ``range(len(y))``: random, sorted by label, or Dirichlet label shift.

    ``dirichlet``: every class spreads its samples over the stream's batch slots in
    Dirichlet(alpha) proportions, so small alpha gives few classes per batch (Gong et al.,
    2022, NOTE, arXiv:2208.05117; the label-shift protocol SAR and DeYO use).
    """
    if order is None:
        return rng.permutation(len(y))
    if order == "sorted":
        return np.lexsort((rng.random(len(y)), y))  # by label, random within a label
    if order != "dirichlet":
        raise ValueError(f"label_order must be null, 'sorted' or 'dirichlet', got {order!r}")
    slots = max(1, len(y) // batch)
    buckets: list[list[int]] = [[] for _ in range(slots)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(rng.dirichlet([alpha] * slots)) * len(idx)).astype(int)[:-1]
        for s, part in enumerate(np.split(idx, cuts)):
            buckets[s].extend(part.tolist())
    return np.concatenate([rng.permutation(b) for b in buckets if b]).astype(int)


def _segment(name: str, severity: int, n: int, setting: dict, root: str, rng):
    """(x, y, severity) of ``n`` random images of one corruption, in the setting's label order."""
    images, labels = load_corruption(name, severity, root)
    idx = rng.choice(len(labels), size=min(n, len(labels)), replace=False)
    order = label_order(
        labels[idx],
        setting.get("label_order"),
        setting["batch_size"],
        setting.get("dirichlet_alpha", 0.1),
        rng,
    )
    idx = idx[order]
    return (
        to_float_images(images[idx]),
        torch.as_tensor(labels[idx]),
        torch.full((len(idx),), severity),
    )


def check_setting(name: str, setting: dict) -> None:
    """ValueError naming ``adapt.settings.<name>.<key>`` for a stream that cannot be built."""
    where = f"adapt.settings.{name}"
    if setting.get("stream") not in STREAMS:
        raise ValueError(f"{where}.stream must be one of {STREAMS}, got {setting.get('stream')!r}")
    for key in ("batch_size", "n_images"):
        v = setting.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}.{key} must be an integer >= 1, got {v!r}")


def make_stream(setting: dict, corruptions: list[str], severity: int, root: str, seed: int):
    """The list of :class:`Batch` for one setting (see the module docstring)."""
    rng = np.random.default_rng(seed)
    kind, bs, n = setting["stream"], setting["batch_size"], setting["n_images"]
    segments = []  # (x, y, sev, corruption index, reset_before)
    if kind in ("reset", "continual"):
        for i, name in enumerate(corruptions):
            seg = _segment(name, severity, n, setting, root, rng)
            segments.append((*seg, i, i == 0 or kind == "reset"))
    elif kind == "gradual":
        for i, name in enumerate(corruptions):
            for j, sev in enumerate(GRADUAL):
                segments.append((*_segment(name, sev, n, setting, root, rng), i, i == j == 0))
    elif kind == "mixed":
        parts = [_segment(c, severity, n, setting, root, rng) for c in corruptions]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        sev = torch.cat([p[2] for p in parts])
        idx = torch.cat([torch.full((len(p[1]),), i) for i, p in enumerate(parts)])
        perm = torch.as_tensor(rng.permutation(len(y)))
        return [Batch(x[i], y[i], idx[i], sev[i], k == 0) for k, i in enumerate(perm.split(bs))]
    else:
        raise ValueError(f"stream must be one of {STREAMS}, got {kind!r}")
    batches = []
    for x, y, sev, i, reset in segments:
        for k, s in enumerate(range(0, len(y), bs)):
            sl = slice(s, s + bs)
            batches.append(
                Batch(x[sl], y[sl], torch.full((len(y[sl]),), i), sev[sl], reset and k == 0)
            )
    return batches


def run_stream(method, stream: list[Batch], severity: int, names: list[str], fabric) -> dict:
    """Adapt ``method`` along ``stream`` on ``fabric``'s device and precision.

    Returns ``errors`` (corruption name -> error rate on its samples at ``severity``: a
    torchmetrics mean of the 0/1 loss in float64 on the device, so exactly wrong / n), ``n``
    (those samples per name) and ``batches`` (adaptation steps taken).
    """
    device = fabric.device
    err = [MeanMetric().set_dtype(torch.float64).to(device) for _ in names]
    for b in stream:
        if b.reset:
            method.reset()
        x, y = fabric.to_device(b.x), fabric.to_device(b.y)
        with fabric.autocast():
            wrong = (method(x).argmax(1) != y).double()  # (B,)
        at = b.severity == severity
        for i in b.corruption[at].unique().tolist():
            err[i].update(wrong[fabric.to_device(at & (b.corruption == i))])
    seen = [(n, e) for n, e in zip(names, err) if e.update_called]
    return {
        "errors": {n: float(e.compute()) for n, e in seen},
        "n": {n: int(e.weight) for n, e in seen},
        "batches": len(stream),
    }


def source_subset(clean: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random clean training images and labels (EATA's Fisher, RMT's prototypes), CPU."""
    data = load_fashion_mnist(clean)
    idx = torch.as_tensor(np.random.default_rng(seed).choice(len(data.y_train), n, replace=False))
    return to_float_images(data.x_train[idx]), data.y_train[idx]


def method_kwargs(name: str, params: dict, source: tuple | None, seed: int) -> dict:
    """The hyperparameters ``build(name, ...)`` gets: params' ``adapt.hparams.<name>``, the
    seed of adapting methods, and the clean samples EATA and RMT need."""
    kw = dict(params["adapt"]["hparams"].get(name, {}))
    if name in ADAPTING:
        kw["seed"] = seed
    if name == "eata":
        kw["fisher_data"] = source[0]
    if name == "rmt":
        kw["source_data"] = source
    return kw


def setting_corruptions(params: dict, name: str) -> list[str]:
    """The corruptions of setting ``name``: its own list, else ``adapt.corruptions``."""
    return list(
        params["adapt"]["settings"][name].get("corruptions", params["adapt"]["corruptions"])
    )


def run_identity(params: dict, norm: str, setting: str, method: str, seed: int):
    """``(config, data)`` of one run: everything that decides its errors (no machine knobs)."""
    cfg, paths = params["adapt"], params["paths"]
    corruptions = setting_corruptions(params, setting)
    config = {
        "model": params["model"],
        "norm": norm,
        "severity": cfg["severity"],
        "setting": {**cfg["settings"][setting], "corruptions": corruptions},
        "method": method,
        "hparams": cfg["hparams"].get(method, {}),
        "seed": seed,
        "trainer": cfg["trainer"],
    }
    root = Path(paths["corrupted"])
    data = [checkpoint_path(params, norm), root / "labels.npy"]
    data += [root / f"{c}.npy" for c in corruptions]
    if method in NEEDS_SOURCE:
        config["n_source"] = cfg["n_source"]
        data.append(Path(paths["clean"]))
    return run_config(config), data


def record_path(params: dict, norm: str, setting: str, method: str, seed: int) -> Path:
    return Path(params["paths"]["runs"]) / "adapt" / norm / setting / method / f"seed{seed}.json"


def jobs(params: dict) -> list[tuple[str, str, str, int]]:
    """Every (norm, setting, method, seed) of the params, the costliest methods first."""
    cfg = params["adapt"]
    for name, setting in cfg["settings"].items():
        check_setting(name, setting)
    cost = {"rmt": 0, "sar": 1, "deyo": 2, "eata": 3}
    methods = sorted(cfg["methods"], key=lambda m: cost.get(m, 9))
    return [
        (norm, s, m, seed)
        for m in methods
        for s in cfg["settings"]
        for seed in cfg["seeds"]
        for norm in cfg["norms"]
    ]


def _worker_state(params: dict) -> dict:
    """Per process: the Fabric, source models on its device, a one-entry stream cache."""
    fab_cfg = params["adapt"]["trainer"]
    if fab_cfg.get("devices", 1) != 1:
        raise ValueError(
            f"adapt.trainer.devices must be 1 (a stream adapts sequentially), got "
            f"{fab_cfg['devices']!r}; use machine.workers for runs side by side"
        )
    fabric = build_fabric(fab_cfg)
    return {"params": params, "fabric": fabric, "models": {}, "stream": (None, None), "source": {}}


def _run(job: tuple[str, str, str, int], state: dict) -> tuple[tuple, dict]:
    """One run (cached while its identity holds): build the method on the device, adapt."""
    norm, setting, method, seed = job
    params, fabric = state["params"], state["fabric"]
    cfg = params["adapt"]
    names = setting_corruptions(params, setting)
    if state["stream"][0] != (setting, seed):
        stream = make_stream(
            cfg["settings"][setting], names, cfg["severity"], params["paths"]["corrupted"], seed
        )
        state["stream"] = ((setting, seed), stream)
    stream = state["stream"][1]
    if norm not in state["models"]:
        state["models"][norm] = fabric.to_device(load_source_model(params, norm))

    def adapt() -> dict:
        source = None
        if method in NEEDS_SOURCE:
            if seed not in state["source"]:
                state["source"] = {
                    seed: source_subset(params["paths"]["clean"], cfg["n_source"], seed)
                }
            source = state["source"][seed]
        torch.manual_seed(seed)
        with fabric.autocast():
            tta = build(
                method, state["models"][norm], **method_kwargs(method, params, source, seed)
            )
        return run_stream(fabric.to_device(tta), stream, cfg["severity"], names, fabric)

    config, data = run_identity(params, norm, setting, method, seed)
    return job, cached_run(record_path(params, *job), config, adapt, data)


def collect(params: dict, records: dict[tuple, dict]) -> dict[str, Any]:
    """errors.json: ``errors[norm][setting][method][corruption]`` one error rate per seed (in
    ``seeds`` order), ``streams[setting]`` its batches and images per corruption,
    ``seconds["<norm>/<setting>/<method>"]`` wall time summed over seeds."""
    cfg = params["adapt"]
    out: dict[str, Any] = {"severity": cfg["severity"], "seeds": cfg["seeds"], "errors": {}}
    seconds: dict[str, float] = {}
    out["streams"] = {}
    for s, setting in cfg["settings"].items():
        first = records[(cfg["norms"][0], s, cfg["methods"][0], cfg["seeds"][0])]
        out["streams"][s] = {
            "batches": first["batches"],
            "batch_size": setting["batch_size"],
            "images": min(first["n"].values()),
            "corruptions": len(first["n"]),
        }
    for norm in cfg["norms"]:
        for s in cfg["settings"]:
            for m in cfg["methods"]:
                runs = [records[(norm, s, m, seed)] for seed in cfg["seeds"]]
                cell = out["errors"].setdefault(norm, {}).setdefault(s, {}).setdefault(m, {})
                for c in runs[0]["errors"]:
                    cell[c] = [r["errors"][c] for r in runs]
                seconds[f"{norm}/{s}/{m}"] = round(sum(r["wall_s"] for r in runs), 1)
    out["seconds"] = seconds
    return out


def adapt_all(params: dict, workers: int = 1, threads: int = 1) -> dict[str, Any]:
    """Every run of the params (cached ones reused), then errors.json; returns its content."""
    todo, records = [], {}
    workers = check_pool(workers, params["adapt"]["trainer"], "adapt.trainer")
    all_jobs = jobs(params)
    progress = RunProgress(len(all_jobs), "tta-adapt")

    def line(job, rec) -> None:
        mean = 100 * float(np.mean(list(rec["errors"].values())))
        name = f"{job[0]}/{job[1]}/{job[2]} seed {job[3]}"
        progress.update(name, f"err {mean:.1f}% {rec['wall_s']:.1f} s", cached=rec["cached"])

    for job in all_jobs:
        rec = load_cached(record_path(params, *job), *run_identity(params, *job))
        if rec is None:
            todo.append(job)
        else:
            records[job] = rec | {"cached": True}
            line(job, records[job])
    for job, rec in imap_processes(
        _run, todo, init=_worker_state, init_args=(params,), workers=workers, threads=threads
    ):
        records[job] = rec
        line(job, rec)
    result = collect(params, records)
    if is_global_zero():  # launched as one rank of several (torchrun): every rank ran each job
        atomic_write_json(Path(params["paths"]["results"]) / "errors.json", result)
    return result


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line (the engine's: ``--params``, ``--variant``, ``--set``, ...)."""
    return entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    _, params, mach = parse_entry(build_parser(), argv)
    start = time.perf_counter()
    result = adapt_all(params, mach.workers, mach.threads)
    print(
        f"tta-adapt: {math.fsum(result['seconds'].values()):.0f} s of runs, "
        f"{time.perf_counter() - start:.0f} s wall",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
