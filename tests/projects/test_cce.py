"""projects.cce: tokenizer, data windows, LM module (torch CE vs CCE), entry points, params and
the gpu variant, tokens/s and FLOPs, run identity of a real train stage, report."""

import json
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import throughput_monitor as tm_module
from torch.utils.data import DataLoader

from core.engine import variants
from core.engine.config import load_params, parse_entry
from core.engine.trainer import TRAINER_KEYS, build_trainer
from core.models.gpt import GPT, GPTConfig
from projects.cce import bench, report, tokenizer, train
from projects.cce.bench import bf16_rows
from projects.cce.data import TokenWindows
from projects.cce.report import build_report, headline_metrics, relative_diff
from projects.cce.tokenizer import EOS, byte_capped, encode_documents, train_tokenizer
from projects.cce.train import LMModule, flops_per_token, throughput_monitor, tokens_per_s_steps
from tests.projects.report_helpers import assert_report_regenerates, random_token_data

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ROOT / "projects" / "cce"
TINY_MODEL = dict(vocab_size=67, block_size=16, n_layer=1, n_head=2, n_embd=24)
OPTIM = dict(lr=1e-3, betas=[0.9, 0.95], weight_decay=0.1, warmup_steps=1, min_lr_ratio=0.1)
DOCS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os  # ünïcode ok\n"] * 5


def test_tokenizer_roundtrip_and_eos():
    tok = train_tokenizer(DOCS, vocab_size=300)
    assert 257 <= tok.get_vocab_size() <= 300
    ids = encode_documents(tok, DOCS[:3], batch=2)
    assert ids.dtype == np.uint16
    eos = tok.token_to_id(EOS)
    pieces = np.split(ids, np.flatnonzero(ids == eos) + 1)[:-1]  # each ends with EOS
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == DOCS[:3]
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(DOCS, vocab_size=100)


def test_byte_capped_stops_after_cap():
    docs = ["aaaa", "bbbb", "cccc"]
    assert list(byte_capped(docs, 5)) == ["aaaa", "bbbb"]
    assert list(byte_capped(docs, 100)) == docs


def test_token_windows_deterministic_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = TokenWindows(tokens, 16, 10, seed=3), TokenWindows(tokens, 16, 10, seed=3)
    np.testing.assert_array_equal(a.starts, b.starts)
    assert not np.array_equal(a.starts, TokenWindows(tokens, 16, 10, seed=4).starts)
    x, y = a[7]
    assert x.dtype == torch.int64 and x.shape == y.shape == (16,)
    torch.testing.assert_close(y[:-1], x[1:])
    assert int(x[0]) == a.starts[7]
    with pytest.raises(ValueError, match="block_size"):
        TokenWindows(tokens[:10], 16, 1, seed=0)


@pytest.mark.parametrize("tie", [True, False])
def test_module_cce_and_torch_same_loss_and_grads(tie):
    """Same seed -> same init; CCE loss and every parameter gradient match materialised CE."""
    cfg = {**TINY_MODEL, "tie_weights": tie}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg["vocab_size"], (3, cfg["block_size"]), generator=g)
    y = torch.randint(0, cfg["vocab_size"], (3, cfg["block_size"]), generator=g)
    out = {}
    for impl in ("torch", "cce"):
        torch.manual_seed(0)
        m = LMModule(cfg, OPTIM, impl)
        loss = m.loss(x, y)
        loss.backward()
        out[impl] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    # float64 reference of the loss from the same weights
    torch.manual_seed(0)
    ref = LMModule(cfg, OPTIM, "torch").double()
    ref_loss = ref.loss(x, y)
    torch.testing.assert_close(out["torch"][0].double(), ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["cce"][0], out["torch"][0], atol=1e-5, rtol=1e-5)
    assert out["cce"][1].keys() == out["torch"][1].keys()
    for name, g_torch in out["torch"][1].items():
        torch.testing.assert_close(out["cce"][1][name], g_torch, atol=1e-5, rtol=1e-4, msg=name)


def test_module_rejects_unknown_impl():
    with pytest.raises(ValueError, match="loss_impl"):
        LMModule(TINY_MODEL, OPTIM, "liger")
    with pytest.raises(ValueError, match="loss_impl"):
        train.run({}, "liger")


def test_flops_per_token_by_hand():
    """PaLM's 6 N + 12 L D T, N without the position embedding, for a model small enough to
    count by hand: V 10, T 4, D 8, 1 layer, tied head."""
    cfg = GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=2, n_embd=8, tie_weights=True)
    model = GPT(cfg)
    # tok_emb 10*8; per block: 2 LN (2*2*8), qkv 8*24 + 24, proj 8*8 + 8, MLP 8*32 + 32 and
    # 32*8 + 8; final LN 2*8. (GPT's bias default is on; the test checks that count first.)
    n = 80 + 32 + (192 + 24) + (64 + 8) + (256 + 32) + (256 + 8) + 16
    assert model.num_params() - model.pos_emb.weight.numel() == n
    assert flops_per_token(model) == 6 * n + 12 * 1 * 8 * 4


def test_tokens_per_s_window_by_hand(tmp_path, monkeypatch):
    """The tokens/s the train stage reads is the ThroughputMonitor's value for steps 4..last
    logged step: with a clock where step k lasts k seconds, steps 4..10 of 12 (logged every 5)
    took 4 + ... + 10 = 49 s for 7 x 2 x 8 tokens."""
    assert tokens_per_s_steps(120, 10) == (4, 120)
    assert tokens_per_s_steps(12, 5) == (4, 10)
    clock = types.SimpleNamespace(now=0.0, calls=0)

    def perf_counter():  # called once at train start, then once per step end
        clock.now += clock.calls
        clock.calls += 1
        return clock.now

    monkeypatch.setattr(tm_module, "time", types.SimpleNamespace(perf_counter=perf_counter))
    windows = TokenWindows(np.arange(500, dtype=np.uint16) % 67, 8, 24, seed=0)
    module = LMModule({**TINY_MODEL, "block_size": 8}, OPTIM, "torch")
    cfg = {"accelerator": "cpu", "devices": 1, "max_steps": 12, "log_every_n_steps": 5}
    trainer = build_trainer(cfg, tmp_path, callbacks=[throughput_monitor(4, 10)], checkpoint=False)
    trainer.fit(module, DataLoader(windows, batch_size=2))
    assert trainer.logged_metrics[train.TOKENS_PER_S] == pytest.approx(7 * 2 * 8 / 49)


@pytest.mark.parametrize("module", [tokenizer, train, bench, report])
def test_entry_point_help(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    assert "--params" in capsys.readouterr().out


def test_bench_cases_build_each_method():
    """The bench's cases on the shared harness: every CPU method computes the same loss from the
    same seeded inputs; CUDA-only ones are skipped with a reason; unknown names are refused."""
    losses = {}
    for method in bench.CPU_METHODS:
        if bench.available(method, "cpu"):
            continue
        torch.manual_seed(0)
        forward, leaves = bench.build({"method": method, "n": 8, "v": 16, "d": 4, "device": "cpu"})
        losses[method] = forward().item()
        assert [x.shape for x in leaves] == [(8, 4), (16, 4)]
    assert len(losses) >= 3 and max(losses.values()) - min(losses.values()) < 1e-5
    assert bench.available("cce_triton", "cpu") == "needs CUDA"
    with pytest.raises(ValueError, match="unknown method"):
        bench.loss_fn("nope")


OUTPUTS = ("paths.data", "paths.runs", "paths.results", "bench.out", "report.readme_section")


def _get(params: dict, dotted: str):
    for key in dotted.split("."):
        params = params[key]
    return params


@pytest.mark.parametrize("variant", [None, "gpu"])
def test_every_stage_parses_the_params_and_variant(variant):
    """Each entry point's parser reads the defaults and the gpu variant; the merged params
    build a GPTConfig, carry only known trainer keys and a bench command; the variant's
    outputs never land on the defaults' (so `make exp` cannot overwrite them)."""
    argv = ["--params", str(PROJECT / "params.yaml")] + (["--variant", variant] if variant else [])
    parsers = {
        "tokenizer": tokenizer.build_parser(),
        "train": train.build_parser(),
        "report": report.build_parser(),
    }
    merged = {}
    for name, parser in parsers.items():
        extra = ["--loss-impl", "cce"] if name == "train" else []
        _, merged[name], mach = parse_entry(parser, argv + extra)
        assert mach.threads >= 1
    p = merged["train"]
    assert merged["tokenizer"] == merged["report"] == p
    GPTConfig(**p["model"])
    assert p["model"]["vocab_size"] >= p["data"]["vocab_size"]
    assert set(p["trainer"]) <= TRAINER_KEYS and "enable_progress_bar" not in p["trainer"]
    assert {"out", "n", "v", "d", "repeats", "rounds"} <= set(p["bench"])
    assert 0 < p["report"]["agreement_tol"] < 1
    if variant:
        default = load_params(PROJECT / "params.yaml")
        for key in OUTPUTS:
            assert _get(p, key) != _get(default, key), key
        assert p["trainer"]["accelerator"] == "gpu" and p["model"]["vocab_size"] == 256000


def test_gpu_variant_runs_as_a_dvc_experiment():
    cmd = variants.exp_command("cce", "gpu")
    assert cmd[:6] == ["dvc", "exp", "run", "--temp", "-n", "cce-gpu"]
    assert 'projects/cce/params.yaml:paths.results="projects/cce/gpu/results"' in cmd
    assert cmd[-1] == "projects/cce/dvc.yaml"


# --- the run identity of a real train stage -------------------------------------------------


def _tiny_params(tmp_path: Path) -> Path:
    """A params file for a ~1 s run on random token arrays (no tokenizer needed)."""
    random_token_data(tmp_path)
    p = load_params(PROJECT / "params.yaml")
    p["paths"] |= {k: str(tmp_path / k) for k in ("data", "runs", "results")}
    p["model"] |= TINY_MODEL
    p["train"] |= {"batch_size": 2, "val_windows": 4, "val_batch_size": 2}
    p["trainer"] |= {"max_steps": 6, "val_check_interval": 3, "log_every_n_steps": 3}
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps(p))  # JSON is YAML
    return path


def test_train_stage_identity(tmp_path, capsys):
    """A rerun with other machine knobs trains nothing; a changed optim param starts fresh
    (not restored from the finished run's checkpoint)."""
    args = ["--params", str(_tiny_params(tmp_path)), "--loss-impl", "cce"]
    first = train.main(args)
    assert not first["cached"] and first["steps"] == 6 and len(first["history"]["train"]) == 6
    assert first["tokens_per_s"] > 0 and first["tokens_per_s_steps"] == [4, 6]
    ckpt = tmp_path / "runs" / "cce" / "checkpoints" / "last.ckpt"
    mtime = ckpt.stat().st_mtime_ns
    csv = (tmp_path / "results" / "cce" / "train_loss.csv").read_text()

    again = train.main(args + ["--set", "machine.threads=1", "--set", "machine.workers=3"])
    assert again["cached"] and ckpt.stat().st_mtime_ns == mtime
    assert again["final_val_loss"] == first["final_val_loss"]
    assert (tmp_path / "results" / "cce" / "train_loss.csv").read_text() == csv

    capsys.readouterr()
    changed = train.main(args + ["--set", "optim.lr=0.003"])
    assert "starting fresh (config changed" in capsys.readouterr().out
    assert not changed["cached"] and len(changed["history"]["train"]) == 6
    assert changed["final_val_loss"] != first["final_val_loss"]
    assert changed["identity"]["config"]["optim"]["lr"] == 0.003


def test_a_record_without_its_weights_trains_again(tmp_path):
    """A fresh clone has results/<impl>/run.json (git) but not runs/<impl>/ (a DVC output): the
    stage must train and write the checkpoint kd distils from, not serve the record."""
    args = ["--params", str(_tiny_params(tmp_path)), "--loss-impl", "torch"]
    first = train.main(args)
    shutil.rmtree(tmp_path / "runs" / "torch")
    again = train.main(args)
    assert not again["cached"] and again["final_val_loss"] == first["final_val_loss"]
    assert (tmp_path / "runs" / "torch" / "checkpoints" / "last.ckpt").exists()


# --- report -----------------------------------------------------------------------------------


def _write_run(results: Path, impl: str, val_loss: float) -> None:
    d = results / impl
    d.mkdir(parents=True)
    r = dict(final_val_loss=val_loss, final_val_ppl=math.exp(val_loss), tokens_per_s=100.0)
    r |= dict(peak_memory_mb=500.0, peak_memory_kind="cpu_peak_rss", steps=2, tokens_per_step=64)
    r |= dict(n_params=1000, device="cpu", torch_threads=2, wall_s=3.0, final_train_loss=4.0)
    r |= dict(tokens_per_s_steps=[4, 2], history={"train": [[0, 5.0], [1, 4.0]], "val": [[1, 4]]})
    (d / "run.json").write_text(json.dumps(r))


def _bench(bench: Path) -> None:
    bench.mkdir()
    (bench / "results.md").write_text("| method | MB |\n|---|---|\n| cce | 1 |\n")
    rounds = {"cce_chunked@1.5": (4.0, 3.9, 4.2), "peer_torch_compile": (3.8, 4.0, 4.0)}
    rows = []
    for method, walls in rounds.items():
        row = {"method": method, "n": 8, "v": 16, "d": 4, "fwd_bwd_s": sorted(walls)[1]}
        row |= {"fwd_bwd_cpu_s": 2 * row["fwd_bwd_s"], "time_vs_bound": 1.18}
        row |= {"cpu_time_vs_bound": 1.19, "peak_mem_bytes": 1240}  # 1.24 x the grad buffers
        row["rounds"] = [{"fwd_bwd_s": w, "fwd_bwd_cpu_s": 2 * w} for w in walls]
        rows.append(row)
    meta = {"v": 16, "grad_buffer_bytes": 1000}
    (bench / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}))


def test_report_table_agreement_metrics_and_readme(tmp_path):
    results, bench = tmp_path / "results", tmp_path / "results" / "bench"
    _write_run(results, "torch", 4.0)
    _write_run(results, "cce", 4.1)  # 2.5% apart: must be flagged
    _bench(bench)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\nfooter\n")
    params = {"paths": {"results": str(results)}, "bench": {"out": str(bench)}}
    params["report"] = {"readme": str(readme), "readme_section": "results", "agreement_tol": 0.01}
    agree = build_report(params, readme)
    assert agree["val_loss_rel_diff"] == pytest.approx(0.025)
    assert agree["val_ppl_rel_diff"] == pytest.approx(math.exp(0.1) - 1)
    assert not agree["within_tolerance"]
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("footer\n") and "old" not in text
    assert "| cce | 4.1000 | 60.34 | 100 | 500 | 3 |" in text and "DO NOT agree" in text
    assert "28000" in text and "theirs" in text  # paper Table 1, labelled
    # targets: memory 1.24 <= 1.25 and bound 1.19 <= 1.3 met; peer: median of 4.0/3.8, 3.9/4.0
    # and 4.2/4.0 = 1.05 > 1 -> not met, ours faster in one round of three
    assert "memory 1.24 x the gradient buffers (target <= 1.25: met)" in text
    assert "(target <= 1.3: met)" in text
    assert "median 1.050 x wall time" in text and "faster in 1 of 3" in text
    assert "(target <= 1.0: NOT met)" in text
    # the paired claim over the rounds: 100 ln(peer / ours) = -5.13, +2.53, -4.88 (by hand):
    # mean -2.49, sd 4.35, se 2.51; t(0.975, 2) = 4.3027 -> CI -13.30 to 8.32: inconclusive
    claim = json.loads((results / "report.json").read_text())["bench_targets"]
    claim = claim["cce_chunked@1.5"]["vs_fastest_peer"]["speed_claim"]
    assert claim["verdict"] == "inconclusive" and claim["n"] == 3
    assert claim["mean"] == pytest.approx(-2.492, abs=1e-3)
    assert claim["se"] == pytest.approx(2.513, abs=1e-3)
    assert (claim["ci_low"], claim["ci_high"]) == pytest.approx((-13.305, 8.320), abs=2e-3)
    assert "100 ln(peer / ours) paired over the rounds: inconclusive: -2.5 ± 2.5 %" in text
    report_json = json.loads((results / "report.json").read_text())
    assert report_json["bench_targets"]["cce_chunked@1.5"]["met"] == {
        "memory": True,
        "bound": True,
        "peer": False,
    }
    assert "history" not in report_json["runs"]["cce"]
    m = json.loads((results / "metrics.json").read_text())
    assert m["val_loss"] == {"torch": 4.0, "cce": 4.1} and m["tokens_per_s"]["cce"] == 100.0
    assert m["rel_diff"]["val_loss"] == pytest.approx(0.025)
    assert m["bench"]["cce_chunked@1_5"]["peer"] == pytest.approx(1.05)
    assert m["bench"]["cce_chunked@1_5"]["mem"] == 1.24
    assert (results / "loss_curves.png").stat().st_size > 1000
    assert relative_diff(1.0, 2.0) == 0.5
    # within tolerance once the tolerance is wide enough; a tolerance outside (0, 1) is refused
    params["report"]["agreement_tol"] = 0.2
    assert build_report(params, readme)["within_tolerance"]
    params["report"]["agreement_tol"] = 1.0
    with pytest.raises(ValueError, match="agreement_tol"):
        build_report(params, readme)


def test_report_bf16_targets(tmp_path):
    """Issue 18's verdicts come from the bf16 rows: per-round medians against the fastest peer
    (here peer_torch_compile, faster than torch_eager), memory over that peer's peak, the bf16
    bound; a variant that misses one target says so."""
    results, bench = tmp_path / "results", tmp_path / "results" / "bench"
    _write_run(results, "torch", 4.0)
    _write_run(results, "cce", 4.0)
    _bench(bench)
    doc = json.loads((bench / "results.json").read_text())
    walls = {"cce_chunked@2": (1.0, 1.3, 1.1), "cce_chunked": (1.4, 1.5, 1.6),
             "peer_torch_compile": (1.2, 1.25, 1.1), "torch_eager": (2.0, 2.1, 2.2)}  # fmt: skip
    peaks = {"cce_chunked@2": 280, "cce_chunked": 170, "peer_torch_compile": 580,
             "torch_eager": 3000}  # fmt: skip
    doc["bf16"] = []
    for method, w in walls.items():
        row = {
            "method": method,
            "v": 16,
            "fwd_bwd_s": sorted(w)[1],
            "peak_mem_bytes": peaks[method],
        }
        row |= {"fwd_bwd_cpu_s": 2 * row["fwd_bwd_s"], "cpu_time_vs_bound": 1.2}
        row |= {"time_vs_bound": 1.15 if method == "cce_chunked@2" else 1.35}
        row["rounds"] = [{"fwd_bwd_s": x, "fwd_bwd_cpu_s": 2 * x} for x in w]
        doc["bf16"].append(row)
    doc["bf16"] = bf16_rows(doc["bf16"], 16)  # as the bench stage writes them
    (bench / "results.json").write_text(json.dumps(doc))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    params = {"paths": {"results": str(results)}, "bench": {"out": str(bench)}}
    params["report"] = {"readme": str(readme), "readme_section": "results", "agreement_tol": 0.01}
    build_report(params, readme)
    t = json.loads((results / "report.json").read_text())["bf16_targets"]
    assert set(t) == {"cce_chunked@2", "cce_chunked"}
    two = t["cce_chunked@2"]
    # rounds: 1.0/1.2, 1.3/1.25, 1.1/1.1 -> median 1.0; CPU the same ratios
    assert two["vs_fastest_peer"]["wall_median"] == pytest.approx(1.0)
    assert two["mem_vs_peer"] == pytest.approx(280 / 580)
    assert two["met"] == {"memory": True, "bound": True, "peer": True}
    assert t["cce_chunked"]["met"] == {"memory": True, "bound": False, "peer": False}
    text = readme.read_text()
    assert "bf16 targets at V=16 (issue 18" in text
    assert "- `cce_chunked@2`: vs the fastest peer (peer_torch_compile): median 1.000 x" in text
    assert "peak memory 0.48 x the peer's" in text and "(target <= 0.5: met)" in text
    assert "1.35 x the bf16 6NVD bound" in text and "(target <= 1.3: NOT met)" in text


def test_headline_metrics_without_peer_timings():
    runs = {i: {"final_val_loss": 1.0, "final_val_ppl": math.e} for i in ("torch", "cce")}
    runs = {i: r | {"tokens_per_s": None, "peak_memory_mb": 9.0} for i, r in runs.items()}
    agree = {"val_loss_rel_diff": 0.0, "val_ppl_rel_diff": 0.0}
    t = {"mem_vs_grad_buffers": 1.2, "time_vs_bound": 1.1, "cpu_time_vs_bound": 1.1}
    m = headline_metrics(runs, agree, {"cce_chunked": t | {"vs_fastest_peer": None}})
    assert m["bench"]["cce_chunked"]["peer"] is None and m["tokens_per_s"]["torch"] is None


def test_runs_table_when_tokens_per_s_was_not_measured():
    run = dict(final_val_loss=1.0, final_val_ppl=math.e, tokens_per_s=None, peak_memory_mb=9.0)
    run |= dict(peak_memory_kind="cpu_peak_rss", wall_s=2.0, tokens_per_s_steps=None)
    agree = {"val_loss_rel_diff": 0.0, "val_ppl_rel_diff": 0.0, "within_tolerance": True}
    text = report.runs_table({"torch": run, "cce": run}, agree, 0.01)
    assert "| cce | 1.0000 | 2.72 | — | 9 | 2 |" in text and "not measured" in text


def test_report_regenerates_the_committed_readme_section(tmp_path):
    """From the committed results, the report writes the committed README section, metrics
    and report.json byte for byte (figures too: no timestamps in the PNGs)."""
    p = load_params(PROJECT / "params.yaml")
    p["bench"]["out"] = str(tmp_path / "results" / Path(p["bench"]["out"]).name)
    names = ("metrics.json", "report.json", "loss_curves.png")
    assert_report_regenerates(tmp_path, PROJECT, p, build_report, names)
