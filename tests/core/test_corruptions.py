"""Fashion-MNIST-C corruptions: shape, range, dtype, determinism, severity monotonicity."""

import numpy as np
import pytest

from core.data.corruptions import BENCHMARK, CORRUPTIONS, HOLDOUT, corrupt, plasma_fractal
from core.registry import RegistryError

ALL = BENCHMARK + HOLDOUT


@pytest.fixture(scope="module")
def images():
    """32 synthetic 28x28 uint8 'garments': textured ellipses and bars on a black background."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28]
    out = np.zeros((32, 28, 28))
    for i in range(32):
        cy, cx = rng.uniform(10, 18, 2)
        ry, rx = rng.uniform(5, 11, 2)
        body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        stripes = 0.6 + 0.3 * np.sin(xx * rng.uniform(0.5, 1.5) + yy * rng.uniform(0, 1))
        out[i] = body * stripes
        out[i, int(cy) : int(cy) + 2, 4:24] = rng.uniform(0.3, 1.0)  # a bright bar (edges)
    return np.round(out * 255).astype(np.uint8)


def test_registry_lists_the_19_corruptions():
    assert len(BENCHMARK) == 15 and len(HOLDOUT) == 4
    assert sorted(CORRUPTIONS.names()) == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
def test_shape_range_dtype_determinism(images, name):
    for severity in (1, 5):
        a = corrupt(images, name, severity, seed=3)
        b = corrupt(images, name, severity, seed=3)
        assert a.shape == images.shape and a.dtype == np.float32
        assert a.min() >= 0.0 and a.max() <= 1.0
        np.testing.assert_array_equal(a, b)
    # float input in [0, 1] gives the same result as the uint8 input it came from
    np.testing.assert_array_equal(
        corrupt(images.astype(np.float64) / 255, name, 3, seed=1), corrupt(images, name, 3, seed=1)
    )


@pytest.mark.parametrize("name", ALL)
def test_distortion_grows_with_severity(images, name):
    """Mean absolute difference to the clean image increases strictly from severity 1 to 5."""
    clean = images / 255.0
    d = [np.abs(corrupt(images, name, s, seed=s) - clean).mean() for s in range(1, 6)]
    assert all(b > a for a, b in zip(d, d[1:])), d
    assert d[0] > 0


@pytest.mark.parametrize(
    "name", ["gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "fog", "snow"]
)
def test_random_corruptions_depend_on_the_seed(images, name):
    assert not np.array_equal(corrupt(images, name, 3, seed=0), corrupt(images, name, 3, seed=1))


def test_closed_forms(images):
    x = images / 255.0
    mean = x.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(corrupt(images, "contrast", 5), (x - mean) * 0.15 + mean, atol=1e-6)
    np.testing.assert_allclose(corrupt(images, "brightness", 2), np.clip(x + 0.1, 0, 1), atol=1e-6)
    imp = corrupt(images, "impulse_noise", 5, seed=0)
    changed = imp != x.astype(np.float32)
    assert set(np.unique(imp[changed])) <= {0.0, 1.0}
    assert 0.02 < changed.mean() < 0.07  # a 7% fraction replaced, some by their own value


def test_plasma_fractal_range_and_bad_size():
    m = plasma_fractal(3, 32, 2.0, np.random.default_rng(0))
    assert m.shape == (3, 32, 32)
    np.testing.assert_allclose(m.min(axis=(1, 2)), 0)
    np.testing.assert_allclose(m.max(axis=(1, 2)), 1)
    with pytest.raises(ValueError, match="power of two"):
        plasma_fractal(1, 28, 2.0, np.random.default_rng(0))


def test_bad_input(images):
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "fog", 6)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        corrupt(images[0], "fog", 1)
    with pytest.raises(ValueError, match="non-empty"):
        corrupt(images[:0], "fog", 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(images * 2.0, "fog", 1)
    bad = images / 255.0
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        corrupt(bad, "fog", 1)
    with pytest.raises(RegistryError, match="Known"):
        corrupt(images, "rain", 1)


def test_fashion_mnist_c_generation_round_trip(images, tmp_path):
    """The stage on a fake 6-image test set: files, manifest checksums, loader, determinism."""
    import hashlib
    import json

    import torch

    from core.data.fashion_mnist_c import corruption_seed, generate, load_corruption

    src = tmp_path / "fmnist"
    src.mkdir()
    labels = torch.arange(6) % 10
    for split in ("train", "test"):
        torch.save({"images": torch.from_numpy(images[:6]), "labels": labels}, src / f"{split}.pt")
    manifest = generate(tmp_path / "a", seed=1, source_root=src)
    generate(tmp_path / "b", seed=1, source_root=src)
    assert manifest["n_images"] == 6 and len(manifest["files"]) == 20
    for name, digest in manifest["files"].items():
        data = (tmp_path / "a" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest
        assert (tmp_path / "b" / name).read_bytes() == data  # deterministic given the seed
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == manifest
    assert (tmp_path / "a" / "grid.png").stat().st_size > 0
    x, y = load_corruption("fog", 5, tmp_path / "a")
    assert x.shape == (6, 28, 28) and x.dtype == np.uint8 and y.tolist() == labels.tolist()
    expected = corrupt(images[:6], "fog", 5, seed=corruption_seed(1, "fog", 5))
    np.testing.assert_array_equal(x, np.round(expected * 255).astype(np.uint8))
    with pytest.raises(FileNotFoundError, match="dvc repro data-fashion-mnist-c"):
        load_corruption("fog", 5, tmp_path / "missing")


# ---- issue 15: severity types, odd image sizes, truncated or mismatched files ----


def test_severity_and_seed_must_be_integers(images):
    with pytest.raises(TypeError, match="severity must be an int"):
        corrupt(images[:2], "fog", 2.0)  # passed the `in SEVERITIES` check, then indexed a tuple
    with pytest.raises(TypeError, match="severity"):
        corrupt(images[:2], "fog", True)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        corrupt(images[:2], "fog", 2, seed=-1)
    with pytest.raises(TypeError, match="uint8 or floating"):
        corrupt(images[:2].astype(np.int64), "fog", 2)
    np.testing.assert_array_equal(
        corrupt(images[:2], "fog", np.int64(2)), corrupt(images[:2], "fog", 2)
    )


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (33, 17), (17, 33), (70, 41)])
def test_every_corruption_handles_any_image_size(name, shape):
    x = np.random.default_rng(1).integers(0, 256, (2, *shape)).astype(np.uint8)
    out = corrupt(x, name, 5, seed=3)  # fog / frost broke on 33x17, pixelate on 1x1
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_load_corruption_refuses_mismatched_or_truncated_files(images, tmp_path):
    from core.data.fashion_mnist_c import load_corruption

    stack = np.zeros((5, 100, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "fog.npy", stack)
    np.save(tmp_path / "labels.npy", np.arange(10, dtype=np.int64))
    with pytest.raises(ValueError, match="holds 100 images per severity but labels.npy 10"):
        load_corruption("fog", 1, tmp_path)
    np.save(tmp_path / "labels.npy", np.arange(100, dtype=np.int64))
    x, y = load_corruption("fog", np.int64(3), tmp_path)
    assert x.shape == (100, 28, 28) and y.shape == (100,)
    data = (tmp_path / "fog.npy").read_bytes()
    (tmp_path / "fog.npy").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"fog\.npy is truncated.*data-fashion-mnist-c"):
        load_corruption("fog", 1, tmp_path)
    for severity in (2.0, 0, 6):
        with pytest.raises(ValueError, match="severity must be one of"):
            load_corruption("fog", severity, tmp_path)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        load_corruption("rain", 1, tmp_path)
