"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747): acquisition, checksums, loading.

The four official IDX ``.gz`` files come from, in order:

1. the directory in ``$FASHION_MNIST_DIR`` (given by the user, so it must hold all four files:
   an incomplete one is an error naming the missing files, never a silent fall-through);
2. the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
3. the official download URLs;
4. as root on a Debian-like system, ``apt-get install dataset-fashion-mnist`` (said aloud).

Debian recompressed the ``.gz`` files, so their MD5s differ from the official ones while the
decompressed bytes are the dataset: we always verify the SHA-256 of the decompressed content,
and the official ``.gz`` MD5 too when the files are the official downloads.

Stage ``data-fashion-mnist`` runs ``python -m core.data.fashion_mnist`` and writes
``datasets/fashion-mnist/processed/{train,test}.pt`` (uint8 images, int64 labels) atomically.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from core.utils.io import atomic_save_torch, atomic_write_json

__all__ = [
    "CLASSES",
    "ChecksumError",
    "DataNotFoundError",
    "FashionMNIST",
    "acquire",
    "load_fashion_mnist",
    "prepare",
    "to_float_images",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROCESSED = REPO_ROOT / "datasets" / "fashion-mnist" / "processed"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# name -> (official .gz MD5, SHA-256 of the decompressed IDX bytes, decompressed size)
FILES: dict[str, tuple[str, str, int]] = {
    "train-images-idx3-ubyte.gz": (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        47040016,
    ),
    "train-labels-idx1-ubyte.gz": (
        "25c81989df183df01b3e8a0aad5dffbe",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        60008,
    ),
    "t10k-images-idx3-ubyte.gz": (
        "bef4ecab320f06d8554ea6380940ec79",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        7840016,
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "bb300cfdad3c16e7a12a480ee83cd310",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        10008,
    ),
}

HOW_TO_GET = f"""Ways to get Fashion-MNIST:
  1. put the four official files ({", ".join(FILES)}) in a directory and set FASHION_MNIST_DIR=<dir>;
  2. on Debian/Ubuntu: apt-get install {DEBIAN_PACKAGE}   (installs them in {DEBIAN_DIR});
  3. allow downloads from {URLS[0]} (or {URLS[1]});
  4. run the stage as root on a Debian-like system: it installs {DEBIAN_PACKAGE} itself."""


class FashionMNIST(NamedTuple):
    """Train/test tensors: images uint8 (N, 28, 28), labels int64 (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


class ChecksumError(ValueError):
    """A file's content does not match the official dataset."""


class DataNotFoundError(FileNotFoundError):
    """No source of the raw files is available."""


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path) -> tuple[bytes, bool]:
    """Check one ``.gz`` file; return its decompressed bytes and whether it is the official .gz.

    Raises ChecksumError naming the file when the decompressed content is not the dataset's.
    """
    md5_official, sha_content, size = FILES[path.name]
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise ChecksumError(
            f"{path}: not a valid gzip file ({err}); the file is corrupted.\n{HOW_TO_GET}"
        ) from None
    sha = hashlib.sha256(data).hexdigest()
    if len(data) != size or sha != sha_content:
        raise ChecksumError(
            f"{path}: checksum mismatch: decompressed SHA-256 {sha} ({len(data)} bytes), "
            f"expected {sha_content} ({size} bytes). The file is corrupted or not Fashion-MNIST.\n{HOW_TO_GET}"
        )
    return data, _md5(path) == md5_official


def _complete(directory: Path) -> bool:
    return not _missing(directory)


def _missing(directory: Path) -> list[str]:
    """The official file names not present (as regular files) in ``directory``."""
    return [name for name in FILES if not (directory / name).is_file()]


def _check_user_dir(directory: Path, what: str) -> None:
    """A directory the user named must exist and hold all four files; raise naming the gap."""
    if not directory.is_dir():
        raise DataNotFoundError(f"{what}={directory} is not a directory.\n{HOW_TO_GET}")
    missing = _missing(directory)
    if missing:
        raise DataNotFoundError(
            f"{what}={directory} lacks {', '.join(missing)} (it must hold all four official "
            f"files; unset it to use the other sources).\n{HOW_TO_GET}"
        )


def _download(dest: Path) -> Path | None:
    """Download the official files into ``dest``; None when no URL answers."""
    dest.mkdir(parents=True, exist_ok=True)
    for base in URLS:
        try:
            for name in FILES:
                with (
                    urllib.request.urlopen(base + name, timeout=30) as r,
                    open(dest / name, "wb") as f,
                ):
                    shutil.copyfileobj(r, f)
            for name in FILES:
                if _md5(dest / name) != FILES[name][0]:
                    raise ChecksumError(
                        f"{dest / name}: MD5 differs from the official .gz MD5 (download from {base})"
                    )
            return dest
        except (OSError, ValueError) as err:
            if isinstance(err, ChecksumError):
                raise
            print(f"download from {base} failed: {err}", file=sys.stderr)
    return None


def _apt_install() -> bool:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    print(
        f"no Fashion-MNIST source found: installing the Debian package {DEBIAN_PACKAGE} (running as root)"
    )
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", DEBIAN_PACKAGE]):
        if subprocess.run(cmd, check=False).returncode != 0:
            return False
    return _complete(DEBIAN_DIR)


def acquire(
    download_dir: Path | None = None, *, allow_download: bool = True, allow_apt: bool = True
) -> tuple[Path, str]:
    """Find the raw files; return ``(directory, source name)``.

    Raises DataNotFoundError naming every way to get them when no source works.
    """
    tried = []
    env = os.environ.get("FASHION_MNIST_DIR")
    if env:
        _check_user_dir(Path(env), "FASHION_MNIST_DIR")
        return Path(env), f"FASHION_MNIST_DIR={env}"
    if _complete(DEBIAN_DIR):
        return DEBIAN_DIR, f"Debian package {DEBIAN_PACKAGE}"
    tried.append(f"{DEBIAN_DIR} not present")
    if allow_download:
        target = download_dir or Path(tempfile.mkdtemp(prefix="fashion-mnist-"))
        got = _download(target)
        if got:
            return got, "official download"
        tried.append("official URLs unreachable")
    if allow_apt and _apt_install():
        return DEBIAN_DIR, f"Debian package {DEBIAN_PACKAGE} (installed by this stage)"
    raise DataNotFoundError("Fashion-MNIST not found (" + "; ".join(tried) + ").\n" + HOW_TO_GET)


def _parse_idx(data: bytes) -> np.ndarray:
    """IDX format (LeCun et al. 1998): magic (0, 0, dtype 0x08, ndim), big-endian dims, payload."""
    if data[:3] != b"\x00\x00\x08":
        raise ValueError("not an unsigned-byte IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def prepare(out_dir: str | os.PathLike = DEFAULT_PROCESSED, raw_dir: Path | None = None) -> dict:
    """Acquire, verify and write ``train.pt`` / ``test.pt`` + ``manifest.json`` into ``out_dir``."""
    source = "given directory"
    if raw_dir is None:
        raw_dir, source = acquire()
    else:
        _check_user_dir(Path(raw_dir), "raw_dir")
    out_dir = Path(out_dir)
    arrays, official = {}, []
    for name in FILES:
        data, is_official = verify(raw_dir / name)
        arrays[name] = _parse_idx(data)
        official.append(is_official)
    if source == "official download" and not all(official):
        raise ChecksumError(f"downloaded files in {raw_dir} do not match the official .gz MD5s")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = torch.from_numpy(
            arrays[f"{prefix}-images-idx3-ubyte.gz"].copy()
        )  # (N, 28, 28) uint8
        labels = torch.from_numpy(arrays[f"{prefix}-labels-idx1-ubyte.gz"].astype(np.int64))  # (N,)
        atomic_save_torch({"images": images, "labels": labels}, out_dir / f"{split}.pt")
    manifest = {
        "source": source,
        "raw_dir": str(raw_dir),
        "official_gz_md5_matched": all(official),
        "sha256_decompressed": {n: v[1] for n, v in FILES.items()},
        "n_train": int(arrays["train-labels-idx1-ubyte.gz"].shape[0]),
        "n_test": int(arrays["t10k-labels-idx1-ubyte.gz"].shape[0]),
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    print(f"Fashion-MNIST from {source} ({raw_dir}) verified -> {out_dir}")
    return manifest


def load_fashion_mnist(root: str | os.PathLike | None = None) -> FashionMNIST:
    """Load the processed tensors: x uint8 (N, 28, 28), y int64 (N,), 60k train / 10k test."""
    root = Path(root) if root is not None else DEFAULT_PROCESSED
    paths = [root / "train.pt", root / "test.pt"]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataNotFoundError(
            f"processed Fashion-MNIST missing ({', '.join(missing)}): run `dvc repro data-fashion-mnist` "
            f"(or `python -m core.data.fashion_mnist`).\n{HOW_TO_GET}"
        )
    train, test = (_load_split(p) for p in paths)
    return FashionMNIST(train["images"], train["labels"], test["images"], test["labels"])


def to_float_images(images) -> torch.Tensor:
    """uint8 images (N, H, W), array or tensor -> float32 (N, 1, H, W) in [0, 1]: the input
    every Fashion-MNIST model here takes (Xiao et al. 2017, arXiv:1708.07747)."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.dtype != torch.uint8 or x.dim() != 3:
        raise ValueError(f"images must be uint8 (N, H, W), got {x.dtype} {tuple(x.shape)}")
    return x.float().div(255).unsqueeze(1)


def _load_split(path: Path) -> dict:
    """One processed split; a truncated or foreign file raises ValueError naming it."""
    fix = "rebuild it with `dvc repro data-fashion-mnist`"
    try:
        split = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError or UnpicklingError
        raise ValueError(f"{path} is truncated or not a processed split ({err}): {fix}") from None
    ok = isinstance(split, dict) and {"images", "labels"} <= split.keys()
    if not ok or split["images"].shape[0] != split["labels"].shape[0]:
        raise ValueError(f"{path} does not hold matching 'images' and 'labels': {fix}")
    return split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PROCESSED)
    parser.add_argument(
        "--raw-dir", type=Path, default=None, help="use this directory, skip the source search"
    )
    args = parser.parse_args(argv)
    try:
        prepare(args.out, args.raw_dir)
    except (ChecksumError, DataNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
