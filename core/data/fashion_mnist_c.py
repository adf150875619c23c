"""Fashion-MNIST-C: the Fashion-MNIST test set under 19 corruptions x 5 severities.

Built like CIFAR-10-C (Hendrycks & Dietterich, 2019, arXiv:1903.12261) with the grayscale
corruptions of :mod:`core.data.corruptions`. Stage ``data-fashion-mnist-c`` runs
``python -m core.data.fashion_mnist_c`` and writes ``datasets/fashion-mnist-c/processed/``:

- ``<corruption>.npy``: uint8 ``(5, N, 28, 28)``, severity s at index s - 1;
- ``labels.npy``: int64 ``(N,)`` (the same labels for every corruption and severity);
- ``manifest.json``: seeds, SHA-256 of every file, mean |corrupted - clean| per severity;
- ``grid.png``: one test image, corruption (rows) x severity (columns), to look at.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import numbers
import os
import sys
from pathlib import Path

import numpy as np
import yaml

from core.data.corruptions import BENCHMARK, HOLDOUT, SEVERITIES, corrupt
from core.data.fashion_mnist import load_fashion_mnist
from core.utils.io import atomic_write_bytes, atomic_write_json, load_npy

__all__ = ["DEFAULT_PROCESSED", "corruption_seed", "generate", "load_corruption"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROCESSED = REPO_ROOT / "datasets" / "fashion-mnist-c" / "processed"


def corruption_seed(seed: int, name: str, severity: int) -> int:
    """A stable per-(corruption, severity) seed derived from the stage seed."""
    index = (BENCHMARK + HOLDOUT).index(name)
    return int(np.random.SeedSequence([seed, index, severity]).generate_state(1)[0])


def load_corruption(name: str, severity: int, root: str | os.PathLike | None = None):
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of one corruption at one severity.

    Raises FileNotFoundError saying how to build the data when the stage has not run, and
    ValueError naming the file when it is truncated or its image and label counts differ.
    """
    if name not in BENCHMARK + HOLDOUT:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(BENCHMARK + HOLDOUT)}")
    if not isinstance(severity, numbers.Integral) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    root = Path(root) if root is not None else DEFAULT_PROCESSED
    fix = (
        "build it with `dvc repro data-fashion-mnist-c` (or `python -m core.data.fashion_mnist_c`)"
    )
    stack = load_npy(root / f"{name}.npy", mmap_mode="r", remedy=fix)
    labels = load_npy(root / "labels.npy", remedy=fix)
    if stack.ndim != 4 or stack.shape[0] != len(SEVERITIES) or labels.ndim != 1:
        raise ValueError(
            f"{root / f'{name}.npy'}: expected (5, N, H, W) images and (N,) labels, got "
            f"{stack.shape} and {labels.shape}: {fix}"
        )
    if stack.shape[1] != labels.shape[0]:
        raise ValueError(
            f"{root}: {name}.npy holds {stack.shape[1]} images per severity but labels.npy "
            f"{labels.shape[0]} labels (files from different builds?): {fix}"
        )
    return np.ascontiguousarray(stack[int(severity) - 1]), labels


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _grid_png(clean: np.ndarray, rows: dict[str, np.ndarray]) -> bytes:
    """PNG of ``clean`` then severities 1-5 (columns) for each corruption (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 6, figsize=(6 * 0.9, len(rows) * 0.9))
    for r, (name, sev) in enumerate(rows.items()):
        for c, im in enumerate([clean, *sev]):
            ax = axes[r, c]
            ax.imshow(im, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("clean" if c == 0 else f"s{c}", fontsize=7)
            if c == 0:
                ax.set_ylabel(name.replace("_", "\n"), fontsize=5, rotation=0, ha="right")
    fig.tight_layout(pad=0.2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def generate(
    out_dir: str | os.PathLike = DEFAULT_PROCESSED,
    *,
    seed: int = 0,
    n_images: int | None = None,
    grid_index: int = 0,
    source_root: str | os.PathLike | None = None,
) -> dict:
    """Corrupt the first ``n_images`` test images (all when None); write files atomically.

    Returns the manifest. Hendrycks & Dietterich, 2019 (arXiv:1903.12261).
    """
    out_dir = Path(out_dir)
    data = load_fashion_mnist(source_root)
    clean = data.x_test.numpy()[:n_images]  # (N, 28, 28) uint8
    labels = data.y_test.numpy()[: len(clean)].astype(np.int64)
    manifest = {
        "source": "Fashion-MNIST test set (core.data.fashion_mnist)",
        "n_images": len(clean),
        "seed": seed,
        "benchmark": list(BENCHMARK),
        "holdout": list(HOLDOUT),
        "severities": list(SEVERITIES),
        "layout": "<corruption>.npy: uint8 (5, N, 28, 28), severity s at index s-1",
        "files": {},
        "mean_abs_distortion": {},
    }
    grid = {}
    atomic_write_bytes(out_dir / "labels.npy", blob := _npy_bytes(labels))
    manifest["files"]["labels.npy"] = hashlib.sha256(blob).hexdigest()
    for name in BENCHMARK + HOLDOUT:
        stack = np.empty((len(SEVERITIES), *clean.shape), dtype=np.uint8)
        for s in SEVERITIES:
            x = corrupt(clean, name, s, seed=corruption_seed(seed, name, s))
            stack[s - 1] = np.round(x * 255).astype(np.uint8)
        dist = np.abs(stack.astype(np.float32) - clean[None]).mean(axis=(1, 2, 3)) / 255
        manifest["mean_abs_distortion"][name] = [round(float(d), 5) for d in dist]
        atomic_write_bytes(out_dir / f"{name}.npy", blob := _npy_bytes(stack))
        manifest["files"][f"{name}.npy"] = hashlib.sha256(blob).hexdigest()
        grid[name] = stack[:, grid_index]
        print(f"{name}: distortion per severity {manifest['mean_abs_distortion'][name]}")
    atomic_write_bytes(out_dir / "grid.png", _grid_png(clean[grid_index], grid))
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_PROCESSED))
    parser.add_argument("--params", default=str(REPO_ROOT / "params.yaml"))
    args = parser.parse_args(argv)
    params = {}
    if Path(args.params).exists():
        params = (yaml.safe_load(Path(args.params).read_text()) or {}).get("fashion_mnist_c", {})
    generate(args.out, **params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
