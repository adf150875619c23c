"""Slow end-to-end smoke test of the cce pipeline on a tiny corpus (tokenizer -> 2 runs -> bench -> report)."""

import copy
import json
import sysconfig
from pathlib import Path

import pytest

from core.data.text_corpus import build_corpus
from core.engine.config import load_params
from projects.cce import bench, report, tokenizer, train

PROJECT = Path(__file__).resolve().parents[2] / "projects" / "cce"


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py", "glob.py"):
        (src / name).write_bytes((Path(sysconfig.get_paths()["stdlib"]) / name).read_bytes())
    build_corpus(tmp_path / "corpus", source_dir=src, val_fraction=0.34, test_fraction=0.0)

    p = copy.deepcopy(load_params(PROJECT / "params.yaml"))
    p["paths"] = {k: str(tmp_path / k) for k in ("corpus", "data", "runs", "results")}
    p["data"] = {"vocab_size": 512, "tokenizer_sample_bytes": 50_000}
    p["model"] |= {"vocab_size": 512, "block_size": 32, "n_layer": 1, "n_embd": 32, "n_head": 2}
    p["train"] |= {"batch_size": 4, "val_windows": 8, "val_batch_size": 4}
    p["trainer"] |= {"max_steps": 8, "val_check_interval": 4, "log_every_n_steps": 4}
    p["bench"] |= {"out": str(tmp_path / "results" / "bench"), "n": 64, "v": 256, "d": 16}
    p["bench"] |= {"sweep": [128, 256], "repeats": 1}
    readme = tmp_path / "README.md"
    p["report"] |= {"readme": str(readme), "readme_section": "results"}
    (tmp_path / "params.yaml").write_text(json.dumps(p))  # JSON is YAML
    args = ["--params", str(tmp_path / "params.yaml")]

    tokenizer.main(args)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["vocab_size"] <= 512 and meta["tokens"]["val"] > 100
    for impl in ("torch", "cce"):
        train.main(args + ["--loss-impl", impl])
    bench.main(args)
    report.main(args)

    m = {
        i: json.loads((tmp_path / "results" / i / "run.json").read_text()) for i in ("torch", "cce")
    }
    assert m["torch"]["steps"] == m["cce"]["steps"] == 8
    assert m["cce"]["tokens_per_s"] > 0 and m["cce"]["tokens_per_s_steps"] == [4, 8]
    assert m["cce"]["final_val_loss"] == pytest.approx(m["torch"]["final_val_loss"], rel=1e-3)
    agreement = json.loads((tmp_path / "results" / "report.json").read_text())["agreement"]
    assert agreement["within_tolerance"]
    text = readme.read_text()
    assert "<!-- results:start -->" in text and "| cce |" in text
    assert (tmp_path / "results" / "bench" / "results.json").exists()
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert metrics["val_loss"]["cce"] == m["cce"]["final_val_loss"]
