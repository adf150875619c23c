"""Stage tta-adapt: run every method on every stream (setting) for both norm variants.

A *stream* is a list of batches, each with its corruption and severity per sample and a flag
saying whether the method is reset before it. Streams (``adapt.settings.<name>.stream``):

- ``reset``: corruption by corruption, reset before each (the papers' main protocol);
- ``continual``: the same sequence, never reset (CoTTA / RMT's continual setting);
- ``mixed``: all corruptions' samples shuffled together, never reset (SAR's mixed shifts);
- ``gradual``: per corruption severities 1->5->1, never reset (RMT's gradual setting).

``batch_size: 1`` gives SAR's single-sample setting and ``label_order: sorted | dirichlet``
its online imbalanced label shift (each corruption's samples ordered by label, or in
Dirichlet(alpha)-drawn class proportions per batch). Errors are reported on the samples at
``adapt.severity`` only. Writes ``paths.results/errors.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.data.fashion_mnist import load_fashion_mnist
from core.data.fashion_mnist_c import load_corruption
from core.utils.io import atomic_write_json
from core.utils.parallel import map_processes
from projects.tta.common import arg_parser, load_params, load_source_model, to_float
from projects.tta.methods import build

GRADUAL = (1, 2, 3, 4, 5, 4, 3, 2, 1)


@dataclass
class Batch:
    x: torch.Tensor  # (B, 1, 28, 28) float in [0, 1]
    y: torch.Tensor  # (B,)
    corruption: list[str]
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
    return to_float(images[idx]), torch.as_tensor(labels[idx]), torch.full((len(idx),), severity)


def make_stream(setting: dict, corruptions: list[str], severity: int, root: str, seed: int):
    """The list of :class:`Batch` for one setting (see the module docstring)."""
    rng = np.random.default_rng(seed)
    kind, bs, n = setting["stream"], setting["batch_size"], setting["n_images"]
    segments = []  # (x, y, sev, name, reset_before)
    if kind in ("reset", "continual"):
        for i, name in enumerate(corruptions):
            segments.append(
                (*_segment(name, severity, n, setting, root, rng), name, i == 0 or kind == "reset")
            )
    elif kind == "gradual":
        for i, name in enumerate(corruptions):
            for j, sev in enumerate(GRADUAL):
                segments.append((*_segment(name, sev, n, setting, root, rng), name, i == j == 0))
    elif kind == "mixed":
        parts = [(*_segment(c, severity, n, setting, root, rng), c) for c in corruptions]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        sev = torch.cat([p[2] for p in parts])
        names = [p[3] for p in parts for _ in range(len(p[1]))]
        perm = rng.permutation(len(y))
        batches = []
        for k, s in enumerate(range(0, len(y), bs)):
            i = perm[s : s + bs]
            batches.append(Batch(x[i], y[i], [names[j] for j in i], sev[i], k == 0))
        return batches
    else:
        raise ValueError(f"stream must be reset/continual/mixed/gradual, got {kind!r}")
    batches = []
    for x, y, sev, name, reset in segments:
        for k, s in enumerate(range(0, len(y), bs)):
            batches.append(
                Batch(
                    x[s : s + bs],
                    y[s : s + bs],
                    [name] * len(y[s : s + bs]),
                    sev[s : s + bs],
                    reset and k == 0,
                )
            )
    return batches


def run_stream(method, stream: list[Batch], severity: int) -> dict[str, float]:
    """Error rate per corruption on the samples at ``severity``, adapting along the stream."""
    wrong: dict[str, int] = {}
    total: dict[str, int] = {}
    for b in stream:
        if b.reset:
            method.reset()
        pred = method(b.x).argmax(1)
        for name, ok, sev in zip(b.corruption, (pred == b.y).tolist(), b.severity.tolist()):
            if sev == severity:
                wrong[name] = wrong.get(name, 0) + (not ok)
                total[name] = total.get(name, 0) + 1
    return {name: wrong[name] / total[name] for name in total}


def source_subset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random clean training images and labels (EATA's Fisher, RMT's prototypes)."""
    data = load_fashion_mnist()
    idx = torch.as_tensor(np.random.default_rng(seed).choice(len(data.y_train), n, replace=False))
    return to_float(data.x_train[idx]), data.y_train[idx]


def method_kwargs(name: str, params: dict, source: tuple, seed: int) -> dict:
    kw = dict(params["adapt"]["hparams"].get(name, {}))
    if name in ("tent", "eata", "sar", "deyo", "rmt"):
        kw["seed"] = seed
    if name == "eata":
        kw["fisher_data"] = source[0]
    if name == "rmt":
        kw["source_data"] = source
    return kw


def adapt_norm(norm: str, params: dict) -> tuple[dict, dict]:
    """Every method on every setting and seed for the ``norm`` source model.

    Returns ``(errors, seconds)``: ``errors[setting][method][corruption]`` lists one error rate
    per seed; ``seconds["<norm>/<setting>/<method>"]`` sums wall time over seeds.
    """
    cfg = params["adapt"]
    root = params["paths"]["corrupted"]
    errors_out: dict = {}
    seconds: dict[str, float] = {}
    model = load_source_model(params, norm)
    for seed in cfg["seeds"]:
        needs_source = {"eata", "rmt"} & set(cfg["methods"])
        source = source_subset(cfg["n_source"], seed) if needs_source else None
        for sname, setting in cfg["settings"].items():
            corruptions = setting.get("corruptions", cfg["corruptions"])
            stream = make_stream(setting, corruptions, cfg["severity"], root, seed)
            for mname in cfg["methods"]:
                start = time.time()
                torch.manual_seed(seed)
                method = build(mname, model, **method_kwargs(mname, params, source, seed))
                errors = run_stream(method, stream, cfg["severity"])
                secs = time.time() - start
                cell = errors_out.setdefault(sname, {})
                for c, e in errors.items():
                    cell.setdefault(mname, {}).setdefault(c, []).append(e)
                key = f"{norm}/{sname}/{mname}"
                seconds[key] = round(seconds.get(key, 0) + secs, 1)
                mean = 100 * float(np.mean(list(errors.values())))
                print(f"{norm} seed={seed} {sname:12s} {mname:7s} err {mean:5.1f}%  {secs:5.1f}s")
    return errors_out, seconds


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--norms", nargs="+", help="run only these (others' results kept)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = params["adapt"]
    norms = args.norms or cfg["norms"]
    out = Path(params["paths"]["results"]) / "errors.json"
    # one single-threaded process per norm variant: both cores busy, no thread contention
    runs = map_processes(
        adapt_norm, norms, params, workers=params.get("workers", 1), threads=params["threads"]
    )
    results: dict = {
        "severity": cfg["severity"],
        "seeds": cfg["seeds"],
        "errors": {},
        "seconds": {},
    }
    for norm, (errors, seconds) in zip(norms, runs):
        results["errors"][norm] = errors
        results["seconds"].update(seconds)
    if args.norms and out.exists():  # keep the other norms' results
        old = json.loads(out.read_text(encoding="utf-8"))
        results["errors"] = {**old["errors"], **results["errors"]}
        results["seconds"] = {**old["seconds"], **results["seconds"]}
    atomic_write_json(out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
