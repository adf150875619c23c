"""Stage kd-lm-train: the small GPT student trained alone (CE) and by token-level KD, per seed.

Each (run, seed) of ``lm.runs`` x ``lm.seeds`` trains the student of ``lm.student`` for
``lm.train.steps`` batches of the cce corpus with the ``LMDistill`` module: plain cross-entropy
when the run names no divergence, else ``linear_kd_loss`` against the frozen cce teacher. Every
run of a seed starts from that seed's weights and sees that seed's batches (paired comparisons
across runs); all runs are validated on the same held-out windows. Each result (final val loss,
val curve, times) is cached in ``<results>/runs/<run>_seed<k>.json`` under its run identity
(config, imported code, the teacher checkpoint and the token arrays), so a killed stage resumes
and a rerun recomputes only what changed. Then the teacher is scored on the same windows and
``<results>/summary.json`` collects everything.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from core.data.tokens import load_token_ids
from core.engine.cache import cached_run
from core.engine.config import entry_parser, parse_entry
from core.engine.dist import check_pool, is_global_zero, world_size
from core.engine.identity import run_config
from core.engine.progress import RunProgress
from core.engine.trainer import build_trainer, seed_everything
from core.models.gpt import Block
from core.utils.io import atomic_write_json
from core.utils.parallel import imap_processes
from projects.kd import DEFAULT_PARAMS
from projects.kd.lm_modules import (
    LMDistill,
    batch_loader,
    load_teacher,
    make_student,
    split_run,
    window_batches,
)


def check_train(train: dict[str, Any], world: int = 1) -> None:
    """Validate ``lm.train``: positive sizes, validation points that end on the last step."""
    for key in ("steps", "batch_size", "val_windows", "val_every"):
        if not isinstance(train.get(key), int) or train[key] < 1:
            raise ValueError(f"lm.train.{key} must be a positive integer, got {train.get(key)!r}")
    if train["steps"] % train["val_every"]:
        raise ValueError(
            f"lm.train.steps ({train['steps']}) must be a multiple of lm.train.val_every "
            f"({train['val_every']}) so the last validation is at the last step"
        )
    if train["batch_size"] % world:
        raise ValueError(
            f"lm.train.batch_size ({train['batch_size']}) must be a multiple of the {world} "
            "training processes (trainer.devices x num_nodes): ranks split each batch evenly"
        )


def jobs(lm: dict[str, Any]) -> list[tuple[str, int]]:
    """(run, seed) of every run, in params order (most expensive first) within each seed."""
    return [(name, seed) for seed in lm["seeds"] for name in lm["runs"]]


def run_identity(params: dict[str, Any], name: str, seed: int) -> dict[str, Any]:
    """The config of run (``name``, ``seed``): everything that decides its numbers."""
    lm = params["lm"]
    return run_config(
        {
            "run": name,
            "loss": lm["runs"][name],
            "seed": seed,
            "student": lm["student"],
            "optim": lm["optim"],
            "train": lm["train"],
            "trainer": params["trainer"],
        }
    )


def val_batches(lm: dict[str, Any], block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out windows every run and the teacher are scored on (seed ``val_seed``)."""
    tr = lm["train"]
    tokens = load_token_ids(lm["paths"]["data"], "val")
    return window_batches(tokens, block_size, tr["val_windows"], tr["batch_size"], tr["val_seed"])


def _init(params: dict[str, Any]) -> dict[str, Any]:
    lm = params["lm"]
    teacher = load_teacher(lm["paths"]["teacher_ckpt"])
    return {
        "params": params,
        "teacher": teacher,
        "train_tokens": load_token_ids(lm["paths"]["data"], "train"),
        "val": val_batches(lm, teacher.cfg.block_size),
        "inputs": [lm["paths"]["teacher_ckpt"], lm["paths"]["data"]],
    }


def run_job(job: tuple[str, int], state: dict[str, Any]) -> dict[str, Any]:
    """Train and validate one (run, seed); the cached result when its identity holds."""
    name, seed = job
    params, teacher = state["params"], state["teacher"]
    lm = params["lm"]
    tr, run = lm["train"], lm["runs"][name]
    config = run_identity(params, name, seed)

    def train() -> dict[str, Any]:
        block = teacher.cfg.block_size
        batches = window_batches(
            state["train_tokens"], block, tr["steps"] * tr["batch_size"], tr["batch_size"], seed
        )
        seed_everything(seed)
        student = make_student(teacher.cfg, lm["student"], seed)
        kd_teacher = teacher if run.get("divergence") else None
        module = LMDistill(student, kd_teacher, run, lm["optim"], tr["steps"])
        trainer = build_trainer(
            params["trainer"],
            Path(lm["paths"]["results"]) / "runs",
            logger=False,
            checkpoint=False,
            name=f"{name} seed {seed}",
            max_epochs=1,
            max_steps=tr["steps"],
            val_check_interval=tr["val_every"],
            gradient_clip_val=tr["grad_clip"],
            num_sanity_val_steps=0,
            fsdp_wrap={Block},
        )
        world = world_size(params["trainer"])
        trainer.fit(module, batch_loader(batches, world), batch_loader(state["val"], world))
        kw, hparams = split_run(run)
        val_loss = module.curve[-1][1]
        return {
            "val_loss": val_loss,
            "val_ppl": math.exp(val_loss),
            "curve": module.curve,
            "steps": tr["steps"],
            "tokens_per_step": tr["batch_size"] * block,
            "n_params": student.num_params(),
            "loss": "ce" if kw.get("divergence") is None else "kd",
            **kw,
            "hparams": hparams,
        }

    path = Path(lm["paths"]["results"]) / "runs" / f"{name}_seed{seed}.json"
    return {"run": name, "seed": seed, **cached_run(path, config, train, state["inputs"])}


def score_teacher(params: dict[str, Any]) -> dict[str, Any]:
    """The teacher's val loss on the runs' validation windows (on the params' device)."""
    lm = params["lm"]
    teacher = load_teacher(lm["paths"]["teacher_ckpt"])
    module = LMDistill(teacher, None, {}, lm["optim"], 1)
    trainer = build_trainer(
        params["trainer"],
        Path(lm["paths"]["results"]),
        logger=False,
        checkpoint=False,
        fsdp_wrap={Block},
    )
    val = batch_loader(val_batches(lm, teacher.cfg.block_size), world_size(params["trainer"]))
    trainer.validate(module, val, verbose=False)
    val_loss = module.curve[-1][1]
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "n_params": teacher.num_params(),
        "n_layer": teacher.cfg.n_layer,
        "n_embd": teacher.cfg.n_embd,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)
    parser.add_argument("--run", action="append", help="only these runs (default: all of lm.runs)")
    args, params, mach = parse_entry(parser, argv)
    lm = params["lm"]
    check_train(lm["train"], world_size(params["trainer"]))
    unknown = sorted(set(args.run or []) - set(lm["runs"]))
    if unknown:
        parser.error(f"unknown LM runs {unknown}; params lm.runs has {sorted(lm['runs'])}")
    todo = [j for j in jobs(lm) if args.run is None or j[0] in args.run]
    start = time.perf_counter()
    progress = RunProgress(len(todo), "kd-lm-train")
    runs = []
    for r in imap_processes(
        run_job,
        todo,
        init=_init,
        init_args=(params,),
        workers=check_pool(mach.workers, params["trainer"], "kd-lm-train trainer"),
        threads=mach.threads,
    ):
        progress.update(
            f"{r['run']} seed {r['seed']}",
            f"val loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.1f})",
            cached=r["cached"],
        )
        runs.append({k: v for k, v in r.items() if k != "identity"})
    if args.run is not None:
        return {"runs": runs}
    torch.set_num_threads(mach.threads)
    order = {name: i for i, name in enumerate(lm["runs"])}
    runs.sort(key=lambda r: (order[r["run"]], r["seed"]))
    summary = {
        "teacher": score_teacher(params),
        "student": lm["student"],
        "val_tokens": lm["train"]["val_windows"]
        * runs[0]["tokens_per_step"]
        // lm["train"]["batch_size"],
        "runs": [{k: v for k, v in r.items() if k != "cached"} for r in runs],
        "wall_s": round(time.perf_counter() - start, 1),
    }
    if is_global_zero():  # every rank trained each run; one writes
        atomic_write_json(Path(lm["paths"]["results"]) / "summary.json", summary)
    print(f"kd-lm-train: teacher val ppl {summary['teacher']['val_ppl']:.2f}", flush=True)
    return summary | {"runs": runs}


if __name__ == "__main__":
    main()
