"""Stage kd-lm-train: the small GPT student trained alone (CE) and by token-level KD.

Each run of ``lm.runs`` trains the student of ``lm.student`` on ``lm.train.steps`` batches of
the cce corpus: plain cross-entropy when the run names no divergence, else ``linear_kd_loss``
against the frozen cce teacher. Every run starts from the same seeded weights and sees the same
batches. Per run, ``<results>/runs/<run>.json`` (final val loss / perplexity, wall time, and a
fingerprint of config + teacher + code) and ``<results>/runs/<run>_val.csv`` (validation curve)
are written atomically; a run whose JSON holds the current fingerprint is skipped, so a killed
stage resumes. Runs go to a pool of ``lm.workers`` single-threaded processes, in params order
(most expensive first). Then the teacher is evaluated on the same validation windows and
``<results>/metrics.json`` collects everything.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import time
from pathlib import Path

import torch

from core.data.tokens import load_token_ids
from core.optim import adamw_warmup_cosine
from core.utils.io import atomic_open, atomic_write_json
from core.utils.parallel import imap_processes
from core.utils.runs import load_cached, store_run
from projects.kd.lm_common import (
    DEFAULT_PARAMS,
    evaluate,
    load_params,
    load_teacher,
    make_student,
    split_run,
    step_loss,
    window_batches,
)

# code that decides a run's numbers: a change re-runs it even when its JSON exists
SOURCES = (
    "projects/kd/lm_common.py",
    "projects/kd/lm_train.py",
    "core/models/gpt.py",
    "core/optim.py",
    "core/losses/*.py",
    "kernels/kd/*.py",
    "kernels/cce/*.py",
)


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def inputs_digest(params: dict, root: Path = Path(".")) -> str:
    """Digest of the code in ``SOURCES`` (benchmark scripts aside) and the teacher checkpoint
    (shared by all runs)."""
    files = sorted(f for pattern in SOURCES for f in root.glob(pattern) if f.name != "benchmark.py")
    return _sha256_files([*files, root / params["lm"]["paths"]["teacher_ckpt"]])


def fingerprint(params: dict, name: str, digest: str) -> str:
    """Digest of everything run ``name``'s numbers depend on: its config, the shared training
    config and ``digest`` (code + teacher, :func:`inputs_digest`)."""
    lm = params["lm"]
    cfg = {k: lm[k] for k in ("student", "optim", "train")} | {
        "seed": params["seed"],
        "run": lm["runs"][name],
    }
    return hashlib.sha256((json.dumps(cfg, sort_keys=True) + digest).encode()).hexdigest()


def train_run(params: dict, name: str, fp: str = "") -> dict:
    """Train run ``name`` of ``params["lm"]["runs"]``; writes and returns its metrics
    (``fp``: the run's fingerprint, stored for the skip test)."""
    torch.set_num_threads(params["threads"])
    lm, seed = params["lm"], params["seed"]
    run, tr = lm["runs"][name], lm["train"]
    teacher = load_teacher(lm["paths"]["teacher_ckpt"])
    student = make_student(teacher.cfg, lm["student"], seed)
    block = teacher.cfg.block_size
    train = window_batches(
        load_token_ids(lm["paths"]["data"], "train"),
        block,
        tr["steps"] * tr["batch_size"],
        tr["batch_size"],
        seed,
    )
    val = window_batches(
        load_token_ids(lm["paths"]["data"], "val"),
        block,
        tr["val_windows"],
        tr["batch_size"],
        seed + 1,
    )
    opt, sched = adamw_warmup_cosine(student, lm["optim"], tr["steps"])
    curve: list[tuple[int, float]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    student.train()
    for step, (x, y) in enumerate(train, start=1):
        loss = step_loss(student, teacher, x, y, run)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"run {name}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), tr["grad_clip"])
        opt.step()
        sched.step()
        if step % tr["val_every"] == 0 or step == len(train):
            curve.append((step, evaluate(student, val)))
            print(
                f"[{name}] step {step} train {loss.item():.4f} val {curve[-1][1]:.4f}", flush=True
            )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    kw, hparams = split_run(run)
    val_loss = curve[-1][1]
    metrics = {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "final_train_loss": loss.item(),  # the run's own objective (KD runs: the divergence)
        "steps": len(train),
        "tokens_per_step": tr["batch_size"] * block,
        "wall_s": wall,
        "cpu_s": cpu,  # this process's CPU time: steadier than wall time on a shared machine
        "n_params": student.num_params(),
        "loss": "ce" if kw.get("divergence") is None else "kd",
        **kw,
        "hparams": hparams,
        "torch_threads": torch.get_num_threads(),
    }
    out = Path(lm["paths"]["results"]) / "runs"
    with atomic_open(out / f"{name}_val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "val_loss", "val_ppl"])
        w.writerows((s, f"{v:.6f}", f"{math.exp(v):.4f}") for s, v in curve)
    store_run(out / f"{name}.json", {"fingerprint": fp}, metrics)  # after the curve: see done()
    return metrics


def _work(job: tuple[dict, str, str], _state: dict) -> str:
    params, name, fp = job
    m = train_run(params, name, fp)
    return f"[{name}] val ppl {m['val_ppl']:.2f} in {m['wall_s']:.0f} s ({m['cpu_s']:.0f} CPU s)"


def done(out: Path, name: str, fp: str) -> bool:
    """Whether ``<out>/<name>.json`` holds results for fingerprint ``fp`` (and its curve exists)."""
    return (
        load_cached(out / f"{name}.json", {"fingerprint": fp}, [out / f"{name}_val.csv"])
        is not None
    )


def collect(params: dict) -> dict:
    """Evaluate the teacher on the runs' validation windows; write and return metrics.json."""
    torch.set_num_threads(params["threads"])
    lm = params["lm"]
    teacher = load_teacher(lm["paths"]["teacher_ckpt"])
    val = window_batches(
        load_token_ids(lm["paths"]["data"], "val"),
        teacher.cfg.block_size,
        lm["train"]["val_windows"],
        lm["train"]["batch_size"],
        params["seed"] + 1,
    )
    t_loss = evaluate(teacher, val)
    out = Path(lm["paths"]["results"])
    runs = {}
    for name in lm["runs"]:
        m = json.loads((out / "runs" / f"{name}.json").read_text())
        m.pop("config")  # the run's fingerprint
        runs[name] = m
    metrics = {
        "teacher": {
            "val_loss": t_loss,
            "val_ppl": math.exp(t_loss),
            "n_params": teacher.num_params(),
            "n_layer": teacher.cfg.n_layer,
            "n_embd": teacher.cfg.n_embd,
        },
        "student": {**lm["student"], "n_params": runs[next(iter(runs))]["n_params"]},
        "val_tokens": lm["train"]["val_windows"] * teacher.cfg.block_size,
        "runs": runs,
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params YAML file")
    parser.add_argument("--run", action="append", help="only these runs (default: all of lm.runs)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    lm = params["lm"]
    names = args.run or list(lm["runs"])
    unknown = sorted(set(names) - set(lm["runs"]))
    if unknown:
        raise SystemExit(f"unknown LM runs {unknown}; params lm.runs has {sorted(lm['runs'])}")
    out = Path(lm["paths"]["results"]) / "runs"
    todo, digest = [], inputs_digest(params)
    for name in names:
        fp = fingerprint(params, name, digest)
        if done(out, name, fp):
            print(f"[{name}] up to date, skipped", flush=True)
        else:
            todo.append((params, name, fp))
    for line in imap_processes(_work, todo, workers=lm["workers"], threads=params["threads"]):
        print(line, flush=True)
    if args.run is None:
        m = collect(params)
        print(f"teacher val ppl {m['teacher']['val_ppl']:.2f}", flush=True)


if __name__ == "__main__":
    main()
