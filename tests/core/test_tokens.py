"""core.data.tokens: memory-mapped token arrays and the missing-file error."""

import numpy as np
import pytest

from core.data.tokens import load_token_ids


def test_load_token_ids_is_memory_mapped_and_exact(tmp_path):
    ids = np.arange(1000, dtype=np.uint16)
    np.save(tmp_path / "val.npy", ids)
    got = load_token_ids(tmp_path, "val")
    assert isinstance(got, np.memmap) and got.dtype == np.uint16
    np.testing.assert_array_equal(got, ids)


def test_missing_split_names_the_path_and_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.npy missing: run `make tokens`"):
        load_token_ids(tmp_path, "train", how_to_make="`make tokens`")
    with pytest.raises(FileNotFoundError, match="cce-tokenizer"):
        load_token_ids(tmp_path, "train")


def test_truncated_or_foreign_split_is_a_named_error(tmp_path):
    np.save(tmp_path / "train.npy", np.arange(1000, dtype=np.uint16))
    data = (tmp_path / "train.npy").read_bytes()
    (tmp_path / "train.npy").write_bytes(data[:-10])  # a killed copy
    with pytest.raises(ValueError, match=r"train\.npy is truncated.*cce-tokenizer"):
        load_token_ids(tmp_path, "train")
    np.save(tmp_path / "train.npy", np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="1-D integer id array"):
        load_token_ids(tmp_path, "train")
