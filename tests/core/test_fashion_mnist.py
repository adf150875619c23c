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


# ---- issue 15 item 15: a user-given directory that is wrong is an error, never a fall-through --


def _no_other_source(monkeypatch):
    def forbidden(*_a, **_k):
        raise AssertionError("fell through to another source")

    monkeypatch.setattr(fm, "_download", forbidden)
    monkeypatch.setattr(fm, "_apt_install", forbidden)
    monkeypatch.setattr(fm, "_complete", lambda d: False if d == fm.DEBIAN_DIR else forbidden())


def test_incomplete_env_dir_names_the_missing_files_and_tries_nothing_else(monkeypatch, tmp_path):
    names = list(fm.FILES)
    for name in names[:2]:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    _no_other_source(monkeypatch)
    with pytest.raises(fm.DataNotFoundError, match=f"lacks {names[2]}, {names[3]}"):
        fm.acquire()
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "file"))
    with pytest.raises(fm.DataNotFoundError, match="is not a directory"):
        fm.acquire()


def test_prepare_with_an_incomplete_raw_dir_names_the_missing_files(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(fm.DataNotFoundError, match=r"raw_dir=.*raw lacks train-images"):
        fm.prepare(tmp_path / "out", raw_dir=tmp_path / "raw")
    assert fm.main(["--out", str(tmp_path / "out"), "--raw-dir", str(tmp_path / "raw")]) == 1


def test_truncated_processed_split_is_a_named_error(tmp_path):
    images, labels = torch.zeros(4, 28, 28, dtype=torch.uint8), torch.arange(4)
    for split in ("train", "test"):
        torch.save({"images": images, "labels": labels}, tmp_path / f"{split}.pt")
    assert fm.load_fashion_mnist(tmp_path).x_train.shape == (4, 28, 28)
    data = (tmp_path / "test.pt").read_bytes()
    (tmp_path / "test.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"test.pt is truncated.*dvc repro data-fashion-mnist"):
        fm.load_fashion_mnist(tmp_path)
    torch.save({"images": images, "labels": labels[:3]}, tmp_path / "test.pt")
    with pytest.raises(ValueError, match="matching 'images' and 'labels'"):
        fm.load_fashion_mnist(tmp_path)


def test_to_float_images_scales_uint8_and_adds_the_channel():
    x = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)  # (1, 2, 2)
    out = fm.to_float_images(x)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 2, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
    torch.testing.assert_close(fm.to_float_images(torch.from_numpy(x)), out)
    with pytest.raises(ValueError, match="uint8"):
        fm.to_float_images(x.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        fm.to_float_images(x[0])
