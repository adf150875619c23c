import gzip
import shutil

import numpy as np
import pytest
import torch

from core.data import fashion_mnist as fm

HAVE_DEBIAN = all((fm.DEBIAN_DIR / n).exists() for n in fm.FILES)
needs_data = pytest.mark.skipif(not HAVE_DEBIAN, reason="apt-get install dataset-fashion-mnist")


def test_parse_idx_roundtrip():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data = b"\x00\x00\x08\x03" + np.array([2, 3, 4], dtype=">u4").tobytes() + arr.tobytes()
    np.testing.assert_array_equal(fm._parse_idx(data), arr)


@needs_data
def test_one_changed_byte_is_a_checksum_error_naming_the_file(tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress((fm.DEBIAN_DIR / name).read_bytes()))
    raw[100] ^= 1  # one byte of content changed, valid gzip around it
    (tmp_path / name).write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(fm.ChecksumError, match=rf"{name}: checksum mismatch") as info:
        fm.verify(tmp_path / name)
    assert "FASHION_MNIST_DIR" in str(info.value)  # names the ways to get the data


@needs_data
def test_one_changed_byte_in_the_gz_stream_is_an_error_naming_the_file(tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    data = bytearray((fm.DEBIAN_DIR / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(fm.ChecksumError, match=name):
        fm.verify(tmp_path / name)


@needs_data
def test_debian_files_verify_and_are_not_the_official_gz():
    _, official = fm.verify(fm.DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz")
    assert official is False  # Debian recompressed: content verified, .gz MD5 differs


def test_missing_everywhere_names_every_way(monkeypatch, tmp_path):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nope")
    with pytest.raises(fm.DataNotFoundError) as info:
        fm.acquire(allow_download=False, allow_apt=False)
    msg = str(info.value)
    for way in ("FASHION_MNIST_DIR", "apt-get install dataset-fashion-mnist", "http", "root"):
        assert way in msg


@needs_data
def test_env_dir_takes_precedence_and_prepare_writes_tensors(monkeypatch, tmp_path):
    src = tmp_path / "raw"
    shutil.copytree(fm.DEBIAN_DIR, src)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(src))
    assert fm.acquire(allow_download=False, allow_apt=False) == (src, f"FASHION_MNIST_DIR={src}")
    manifest = fm.prepare(tmp_path / "out")
    assert manifest["n_train"] == 60000 and manifest["source"].startswith("FASHION_MNIST_DIR")
    data = fm.load_fashion_mnist(tmp_path / "out")
    assert data.x_train.shape == (60000, 28, 28) and data.x_train.dtype == torch.uint8
    assert data.y_test.shape == (10000,) and data.y_test.dtype == torch.int64
    assert torch.bincount(data.y_train).tolist() == [6000] * 10  # balanced classes, as published


def test_loader_says_how_to_build(tmp_path):
    with pytest.raises(fm.DataNotFoundError, match="dvc repro data-fashion-mnist"):
        fm.load_fashion_mnist(tmp_path)
