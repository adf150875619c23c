"""A real text corpus on every machine: the running CPython's standard library source.

Stage ``data-pystdlib`` runs ``python -m core.data.text_corpus``: it collects the stdlib ``.py``
files (site-packages and ``__pycache__`` excluded; test packages only with
``include_tests: true``), splits them train/val/test by a stable hash of the relative path, and
writes ``datasets/pystdlib/processed/{train,val,test}.jsonl`` (one ``{"path", "text"}`` per line)
plus ``manifest.json`` (files, bytes, sha256, Python version). ``$CORPUS_DIR`` (or the
``corpus_dir`` param) replaces the stdlib by any directory of UTF-8 text files; change either and
run ``dvc repro -f data-pystdlib``, since DVC cannot see a directory outside the repository.

The four files are built in a temporary sibling directory and swapped in together
(``core.utils.io.atomic_dir``): readers never see splits of two builds. Only regular files are
read (FIFOs, sockets, devices and dangling links are skipped without being opened); files with a
NUL byte or invalid UTF-8 are binary and skipped; an unreadable file is an error naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import yaml

from core.utils.io import atomic_dir, json_text

__all__ = ["SPLITS", "build_corpus", "collect_files", "iter_documents", "read_manifest", "split_of"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROCESSED = REPO_ROOT / "datasets" / "pystdlib" / "processed"
SPLITS = ("train", "val", "test")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}
_TEST_DIRS = {"test", "tests", "idle_test"}


class CorpusError(ValueError):
    """The corpus directory is missing, empty or unreadable."""


def split_of(rel_path: str, val_fraction: float, test_fraction: float) -> str:
    """Stable split of a file by SHA-256 of its relative path (independent of machine and order)."""
    u = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def collect_files(
    root: Path, *, extensions: tuple[str, ...] | None, include_tests: bool
) -> list[Path]:
    """Sorted regular files under ``root``; ``extensions=None`` takes every file.

    Entries that are not regular files (FIFO, socket, device, dangling symlink) are skipped and
    listed on stderr: opening a FIFO would block the stage forever.
    """
    files, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and (include_tests or d not in _TEST_DIRS)
        )
        for name in sorted(filenames):
            if extensions is None or name.endswith(extensions):
                path = Path(dirpath) / name
                (files if path.is_file() else skipped).append(path)  # is_file follows links
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        print(
            f"skipped {len(skipped)} entries that are not regular files: {shown}", file=sys.stderr
        )
    return files


def _read_text(path: Path) -> tuple[bytes, str | None]:
    """(raw bytes, text or None when binary: a NUL byte or invalid UTF-8)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CorpusError(f"cannot read {path}: {err}") from None
    if b"\x00" in raw:
        return raw, None
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw, None


def build_corpus(
    out_dir: str | os.PathLike = DEFAULT_PROCESSED,
    *,
    source_dir: str | os.PathLike | None = None,
    include_tests: bool = False,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    extensions: tuple[str, ...] | None = (".py",),
) -> dict:
    """Write the three JSONL splits and the manifest as one unit; return the manifest."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0 <= val_fraction + test_fraction < 1:
        raise ValueError(
            f"val_fraction + test_fraction must be in [0, 1), got {val_fraction} + {test_fraction}"
        )
    if source_dir is None:
        root, kind = Path(sysconfig.get_paths()["stdlib"]), "cpython-stdlib"
    else:
        root, kind = Path(source_dir), "directory"
        extensions = None
        if not root.exists():
            raise CorpusError(f"corpus directory {root} does not exist (CORPUS_DIR / corpus_dir)")
        if not root.is_dir():
            raise CorpusError(
                f"corpus directory {root} is a file, not a directory (CORPUS_DIR / corpus_dir)"
            )
    files = collect_files(root, extensions=extensions, include_tests=include_tests)
    out_dir = Path(out_dir)
    records, totals, binary = [], dict.fromkeys(SPLITS, 0), []
    with atomic_dir(out_dir) as tmp, contextlib.ExitStack() as stack:
        streams = {
            s: stack.enter_context(open(tmp / f"{s}.jsonl", "w", encoding="utf-8")) for s in SPLITS
        }
        for path in files:
            raw, text = _read_text(path)
            if text is None:
                binary.append(path)
                continue
            if not text.strip():
                continue
            rel = path.relative_to(root).as_posix()
            split = split_of(rel, val_fraction, test_fraction)
            streams[split].write(json.dumps({"path": rel, "text": text}) + "\n")
            totals[split] += len(raw)
            records.append(
                {
                    "path": rel,
                    "bytes": len(raw),
                    "sha256": hashlib.sha256(raw).hexdigest(),
                    "split": split,
                }
            )
        if not records:
            raise CorpusError(
                f"no UTF-8 text files found under {root}"
                + ("" if source_dir else f" with extensions {extensions}")
                + ": point CORPUS_DIR at a directory of text files"
            )
        stack.close()  # the splits are complete before the manifest that describes them
        manifest = {
            "source": kind,
            "root": str(root),
            "python_version": sys.version.split()[0],
            "include_tests": include_tests,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "n_files": {s: sum(r["split"] == s for r in records) for s in SPLITS},
            "bytes": totals,
            "files": records,
        }
        (tmp / "manifest.json").write_text(json_text(manifest), encoding="utf-8")
    if binary:
        print(f"skipped {len(binary)} binary or non-UTF-8 files under {root}", file=sys.stderr)
    print(
        f"corpus from {root}: {len(records)} files, {sum(totals.values()) / 1e6:.1f} MB -> {out_dir}"
    )
    return manifest


def iter_documents(split: str, root: str | os.PathLike | None = None) -> Iterator[str]:
    """Texts of one split, in manifest order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(root or DEFAULT_PROCESSED) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} missing: run `dvc repro data-pystdlib` (or `python -m core.data.text_corpus`)"
        )
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as err:  # ValueError: JSON or UTF-8
                raise ValueError(
                    f"{path}:{number}: not a {{'path', 'text'}} JSON line ({type(err).__name__}); "
                    "the file is truncated or foreign: rebuild it with `dvc repro data-pystdlib`"
                ) from None
            yield text


def read_manifest(root: str | os.PathLike | None = None) -> dict:
    """The manifest written by :func:`build_corpus`; missing or unreadable ones name the fix."""
    path = Path(root or DEFAULT_PROCESSED) / "manifest.json"
    fix = "run `dvc repro data-pystdlib` (or `python -m core.data.text_corpus`)"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: {fix}")
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as err:
        raise ValueError(f"{path} is truncated or not JSON ({err}): {fix}") from None
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise ValueError(f"{path} is not a corpus manifest: {fix}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the text corpus (data-pystdlib stage).")
    parser.add_argument("--out", type=Path, default=DEFAULT_PROCESSED)
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    args = parser.parse_args(argv)
    p = (
        (yaml.safe_load(args.params.read_text()) or {}).get("pystdlib", {})
        if args.params.exists()
        else {}
    )
    source = os.environ.get("CORPUS_DIR") or p.get("corpus_dir")
    try:
        build_corpus(
            args.out,
            source_dir=source,
            include_tests=bool(p.get("include_tests", False)),
            val_fraction=float(p.get("val_fraction", 0.05)),
            test_fraction=float(p.get("test_fraction", 0.05)),
            extensions=tuple(p.get("extensions", [".py"])),
        )
    except CorpusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
