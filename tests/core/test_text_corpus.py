import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

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


# ---- issue 15 items 14-15: splits as one unit, special files, binary files, readers ----


def _corpus(tmp_path, n=40, tag="old"):
    src = tmp_path / f"src_{tag}"
    _write(src, {f"m{i}.txt": f"{tag} {i}\n" for i in range(n)})
    return src


def _snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_a_failed_second_rename_leaves_the_previous_build_whole(tmp_path, monkeypatch):
    out = tmp_path / "out"
    tc.build_corpus(out, source_dir=_corpus(tmp_path), val_fraction=0.2, test_fraction=0.2)
    before = _snapshot(out)
    real, calls = os.replace, []

    def fail_second(src, dst):  # 1st: out -> aside; 2nd: the new build -> out (fails)
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="rename failed"):
        tc.build_corpus(
            out, source_dir=_corpus(tmp_path, tag="new"), val_fraction=0.2, test_fraction=0.2
        )
    monkeypatch.undo()
    assert calls[0][0] == "out" and calls[1][1] == "out" and calls[2][1] == "out"  # put back
    assert _snapshot(out) == before  # train, val, test and manifest all from the first build
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src_new", "src_old"]
    tc.build_corpus(
        out, source_dir=_corpus(tmp_path, tag="new"), val_fraction=0.2, test_fraction=0.2
    )
    texts = [t for s in tc.SPLITS for t in tc.iter_documents(s, out)]
    assert len(texts) == 40 and all(t.startswith("new ") for t in texts)


def test_a_killed_build_keeps_the_old_corpus_and_its_temp_dir_is_cleaned(tmp_path):
    out = tmp_path / "out"
    tc.build_corpus(out, source_dir=_corpus(tmp_path))
    before = _snapshot(out)
    code = (
        "import os, signal, sys\n"
        "from core.data import text_corpus as tc\n"
        "real = tc.split_of\n"
        "def die(*a):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "tc.split_of = die\n"
        "tc.build_corpus(sys.argv[1], source_dir=sys.argv[2])\n"
    )
    src = str(_corpus(tmp_path, tag="new"))
    proc = subprocess.run([sys.executable, "-c", code, str(out), src], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert _snapshot(out) == before
    (stale,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    tc.build_corpus(out, source_dir=src)  # the next build removes the dead build's directory
    assert not stale.exists() and not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_outputs_get_the_umask_default_mode(tmp_path):
    old = os.umask(0o022)
    try:
        tc.build_corpus(tmp_path / "out", source_dir=_corpus(tmp_path))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o644}, modes  # were 0600 through mkstemp
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_fifo_dangling_link_and_binary_files_are_skipped(tmp_path, capsys):
    src = _corpus(tmp_path, n=5)
    os.mkfifo(src / "pipe.txt")  # opening it would block forever
    (src / "dangling.txt").symlink_to(src / "gone.txt")
    (src / "link.txt").symlink_to(src / "m0.txt")  # a link to a regular file is read
    _write(src, {"nul.txt": "looks like text\x00but has a NUL", "latin1.txt": b"caf\xe9"})
    man = tc.build_corpus(tmp_path / "out", source_dir=src)
    assert sorted(r["path"] for r in man["files"]) == sorted(
        ["link.txt"] + [f"m{i}.txt" for i in range(5)]
    )
    err = capsys.readouterr().err
    assert "skipped 2 entries that are not regular files" in err and "pipe.txt" in err
    assert "skipped 2 binary or non-UTF-8 files" in err


def test_corpus_dir_that_is_a_file_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(tc.CorpusError, match="is a file, not a directory"):
        tc.build_corpus(tmp_path / "out", source_dir=tmp_path / "notes.txt")


def test_an_unreadable_file_is_an_error_naming_it(tmp_path, monkeypatch):
    src = _corpus(tmp_path, n=3)
    real = Path.read_bytes

    def deny(self):
        if self.name == "m1.txt":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(tc.CorpusError, match=r"cannot read .*m1.txt.*Permission denied"):
        tc.build_corpus(tmp_path / "out", source_dir=src)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"val_fraction": -0.1}, "val_fraction"), ({"test_fraction": float("nan")}, "test_fraction")],
)
def test_fractions_are_validated_by_name(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tc.build_corpus(tmp_path / "out", source_dir=_corpus(tmp_path), **kwargs)


def test_truncated_split_and_manifest_are_named_errors(tmp_path):
    out = tmp_path / "out"
    tc.build_corpus(out, source_dir=_corpus(tmp_path), val_fraction=0.0, test_fraction=0.0)
    train = out / "train.jsonl"
    train.write_bytes(train.read_bytes()[:-7])  # cut inside the last record
    with pytest.raises(ValueError, match=r"train.jsonl:40: .*truncated.*dvc repro data-pystdlib"):
        list(tc.iter_documents("train", out))
    manifest = out / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:50])
    with pytest.raises(ValueError, match="manifest.json is truncated"):
        tc.read_manifest(out)
    manifest.unlink()
    with pytest.raises(FileNotFoundError, match="dvc repro data-pystdlib"):
        tc.read_manifest(out)
