"""Label noise of the robust-losses runs: symmetric and asymmetric flips, and the condition grid.

Symmetric noise (rate r) replaces a label with probability r by a uniformly drawn *other* class
(Zhang & Sabuncu 2018, arXiv:1805.07836, "uniform noise"); asymmetric noise flips, with
probability r, the look-alike garments of ``ASYM_FLIPS`` (our choice of pairs, in the spirit of
Patrini et al. 2017's class-dependent noise, arXiv:1609.03683).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ASYM_FLIPS",
    "CLEAN",
    "NUM_CLASSES",
    "asymmetric_noise",
    "condition_key",
    "condition_name",
    "conditions",
    "noisy_labels",
    "symmetric_noise",
]

NUM_CLASSES = 10
# Fashion-MNIST classes: 0 T-shirt, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt,
# 7 sneaker, 8 bag, 9 ankle boot. Asymmetric noise swaps look-alike garments (our choice).
ASYM_FLIPS = {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 5, 9: 7}
CLEAN = "clean"  # the 0 % condition, run once and shared by both noise types
SHORT = {"symmetric": "sym", "asymmetric": "asym"}  # metric-key prefixes


def _check_rate(rate: float) -> None:
    if not 0 <= rate < 1:
        raise ValueError(f"noise rate must lie in [0, 1), got {rate!r}")


def symmetric_noise(labels: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Labels (n,) with a ``rate`` fraction replaced by a uniformly drawn different class."""
    _check_rate(rate)
    noisy = labels.copy()
    flip = rng.random(len(labels)) < rate
    shift = rng.integers(1, NUM_CLASSES, size=len(labels))  # never 0: always another class
    noisy[flip] = (labels[flip] + shift[flip]) % NUM_CLASSES
    return noisy


def asymmetric_noise(labels: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Labels (n,) of the classes in ``ASYM_FLIPS`` flipped to their partner with prob ``rate``."""
    _check_rate(rate)
    noisy = labels.copy()
    flip = rng.random(len(labels)) < rate
    for src, dst in ASYM_FLIPS.items():
        noisy[flip & (labels == src)] = dst
    return noisy


NOISES = {"symmetric": symmetric_noise, "asymmetric": asymmetric_noise}


def conditions(noise: dict[str, list[float]]) -> list[tuple[str, float]]:
    """``[(noise type, rate)]`` from params ``noise: {type: [rates]}``; a 0 rate in any list
    becomes one ``("clean", 0.0)`` condition (first), since 0 % noise is the same for all types."""
    out = [(CLEAN, 0.0)] if any(r == 0 for rates in noise.values() for r in rates) else []
    for kind, rates in noise.items():
        if kind not in NOISES:
            raise ValueError(f"unknown noise type {kind!r}; known: {sorted(NOISES)}")
        for r in rates:
            _check_rate(r)
        out += [(kind, float(r)) for r in rates if r > 0]
    return out


def condition_name(noise: str, rate: float) -> str:
    """Display name of a condition: ``clean`` or e.g. ``symmetric 40%``."""
    return noise if noise == CLEAN else f"{noise} {rate:.0%}"


def condition_key(noise: str, rate: float) -> str:
    """Short key of a condition for metrics and file names: ``clean``, ``sym40``, ``asym20``."""
    return noise if noise == CLEAN else f"{SHORT[noise]}{round(100 * rate)}"


def noisy_labels(labels: np.ndarray, noise: str, rate: float, seed: int) -> np.ndarray:
    """Training labels (n,) of one (condition, seed): the same for every loss; clean for
    ``clean``."""
    if noise == CLEAN:
        return labels.copy()
    if noise not in NOISES:
        raise ValueError(f"unknown noise type {noise!r}; known: {sorted(NOISES)}")
    return NOISES[noise](labels, rate, np.random.default_rng(1000 + seed))
