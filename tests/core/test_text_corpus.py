import hashlib
import json

import pytest

from core.data import text_corpus as tc


def _write(root, files):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text if isinstance(text, bytes) else text.encode())


def test_empty_corpus_dir_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(tc.CorpusError, match="no UTF-8 text files found under .*empty"):
        tc.build_corpus(tmp_path / "out", source_dir=tmp_path / "empty")
    assert not (tmp_path / "out" / "train.jsonl").exists()  # nothing half-written


def test_missing_corpus_dir_is_a_clear_error(tmp_path):
    with pytest.raises(tc.CorpusError, match="does not exist"):
        tc.build_corpus(tmp_path / "out", source_dir=tmp_path / "nope")


def test_directory_corpus_manifest_and_splits(tmp_path):
    files = {f"pkg/m{i}.txt": f"text {i}\n" * (i + 1) for i in range(60)}
    files["blob.bin"] = b"\xff\xfe\x00binary"
    files["site-packages/skip.txt"] = "skipped"
    _write(tmp_path / "src", files)
    man = tc.build_corpus(
        tmp_path / "out", source_dir=tmp_path / "src", val_fraction=0.2, test_fraction=0.2
    )
    paths = {r["path"] for r in man["files"]}
    assert paths == {p for p in files if p.startswith("pkg/")}
    for r in man["files"]:
        raw = files[r["path"]].encode()
        assert r["sha256"] == hashlib.sha256(raw).hexdigest() and r["bytes"] == len(raw)
        assert r["split"] == tc.split_of(r["path"], 0.2, 0.2)
    got = {
        s: [
            json.loads(line)["path"]
            for line in (tmp_path / "out" / f"{s}.jsonl").read_text().splitlines()
        ]
        for s in tc.SPLITS
    }
    assert sorted(sum(got.values(), [])) == sorted(paths)
    assert all(len(got[s]) > 0 for s in tc.SPLITS)
    assert list(tc.iter_documents("val", tmp_path / "out")) == [files[p] for p in got["val"]]


def test_split_is_a_stable_hash():
    # an independent recomputation from the hex digest: no dependence on order or hash seed
    for p in ("os.py", "json/decoder.py", "asyncio/tasks.py", "email/mime/text.py"):
        u = int(hashlib.sha256(p.encode()).hexdigest()[:16], 16) / 2**64
        want = "test" if u < 0.3 else "val" if u < 0.5 else "train"
        assert tc.split_of(p, 0.2, 0.3) == want
    fractions = [tc.split_of(f"f{i}.py", 0.1, 0.2) for i in range(4000)]
    assert abs(fractions.count("test") / 4000 - 0.2) < 0.03
    assert abs(fractions.count("val") / 4000 - 0.1) < 0.03


def test_stdlib_collection_excludes_tests_and_site_packages():
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    files = tc.collect_files(root, extensions=(".py",), include_tests=False)
    rels = [f.relative_to(root).parts for f in files]
    assert any(p == ("json", "decoder.py") for p in rels)
    assert not any("site-packages" in p or "test" in p[:-1] for p in rels)
