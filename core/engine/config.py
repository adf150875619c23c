"""Params and the command line every entry point shares.

``params.yaml`` holds what decides a result; its ``machine:`` block (``threads``, ``workers``)
only decides how fast it comes, is listed in no DVC stage and is left out of run identities.
Entry points take ``--params FILE``, ``--set KEY=VALUE`` (dotted key, YAML value; repeatable),
``--variant NAME`` (the overlay ``variants/NAME.yaml`` beside the params file: dotted keys ->
values, the same list ``make exp`` hands to ``dvc exp run -S``) and ``--threads`` / ``--workers``.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Machine",
    "apply_overrides",
    "entry_parser",
    "load_params",
    "load_variant",
    "machine",
    "parse_entry",
]


def load_variant(params_path: str | os.PathLike, name: str) -> dict[str, Any]:
    """The overlay ``variants/<name>.yaml`` beside ``params_path``: ``{dotted.key: value}``."""
    path = Path(params_path).parent / "variants" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise ValueError(f"variant {name!r}: {path} does not exist; known variants: {known}")
    overlay = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(overlay, dict) or not all(isinstance(k, str) for k in overlay):
        raise ValueError(f"{path} must map dotted keys to values")
    return overlay


def apply_overrides(params: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` with each ``{"a.b.c": value}`` set; the parent keys must exist
    (a misspelt key is an error, not a silently added one)."""
    out = copy.deepcopy(dict(params))
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = out
        for i, key in enumerate(parents):
            if not isinstance(node.get(key), dict):
                raise ValueError(
                    f"override {dotted!r}: {'.'.join(parents[: i + 1])!r} is not a params block"
                )
            node = node[key]
        if leaf not in node:
            raise ValueError(
                f"override {dotted!r}: no key {leaf!r} in params; known: {sorted(node)}"
            )
        node[leaf] = value
    return out


def _yaml_value(text: str) -> Any:
    """A ``--set`` value: YAML, with ``3e-4`` read as a float (PyYAML reads it as a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_params(
    path: str | os.PathLike,
    *,
    variant: str | None = None,
    overrides: Mapping[str, Any] | Iterable[str] = (),
) -> dict[str, Any]:
    """The params dict from a YAML file, then a variant overlay, then ``overrides`` (a mapping
    of dotted keys, or ``"key=value"`` strings with YAML values)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} does not exist")
    params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if variant:
        params = apply_overrides(params, load_variant(path, variant))
    if not isinstance(overrides, Mapping):
        pairs = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
            pairs[key] = _yaml_value(value)
        overrides = pairs
    return apply_overrides(params, overrides)


@dataclass(frozen=True)
class Machine:
    """How a stage uses this machine; never part of a result's identity."""

    threads: int = 1  # torch intra-op threads per process
    workers: int = 1  # processes for independent runs


def machine(params: Mapping[str, Any], args: argparse.Namespace | None = None) -> Machine:
    """The ``machine:`` block of ``params``, with ``--threads`` / ``--workers`` on top."""
    block = dict(params.get("machine") or {})
    unknown = set(block) - {"threads", "workers"}
    if unknown:
        raise ValueError(f"unknown machine keys {sorted(unknown)}; allowed: threads, workers")
    for key in ("threads", "workers"):
        value = getattr(args, key, None) if args is not None else None
        if value is not None:
            block[key] = value
    m = Machine(**block)
    for key in ("threads", "workers"):
        value = getattr(m, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"machine.{key} must be an integer >= 1, got {value!r}")
    return m


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def entry_parser(description: str, default_params: str | os.PathLike) -> argparse.ArgumentParser:
    """The argument parser of a project entry point: ``--params``, ``--variant``, ``--set``,
    ``--threads``, ``--workers``. Add the entry point's own options to it."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--params", default=str(default_params), help="params YAML file")
    parser.add_argument(
        "--variant", help="apply variants/VARIANT.yaml beside the params file (e.g. gpu, full)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one param (dotted key, YAML value); repeatable",
    )
    parser.add_argument("--threads", type=_positive_int, help="torch threads per process")
    parser.add_argument("--workers", type=_positive_int, help="processes for independent runs")
    return parser


def parse_entry(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> tuple[argparse.Namespace, dict[str, Any], Machine]:
    """Parse ``argv``; return (args, params with variant and overrides applied, machine)."""
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, variant=args.variant, overrides=args.set)
        return args, params, machine(params, args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits
