"""core.optim: the GPT AdamW recipe's parameter groups and its warm-up + cosine schedule."""

import math

import pytest
from torch import nn

from core.optim import adamw_warmup_cosine, warmup_cosine

CFG = {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "warmup_steps": 4,
       "min_lr_ratio": 0.1}  # fmt: skip


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


def test_decay_only_on_2d_weights_that_are_not_embeddings():
    model = Tiny()
    opt, _ = adamw_warmup_cosine(model, CFG, 20)
    decay, rest = opt.param_groups
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(model.proj.weight)]
    assert {id(p) for p in rest["params"]} == {
        id(model.tok_emb.weight), id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)
    }  # fmt: skip
    assert opt.defaults["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("step", [0, 3, 4, 10, 20, 25])
def test_schedule_matches_the_closed_form(step):
    total, warm, floor = 20, 4, 0.1
    if step < warm:
        want = (step + 1) / warm
    else:
        t = min(1.0, (step - warm) / (total - warm))
        want = floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2
    assert warmup_cosine(step, total, warm, floor) == pytest.approx(want, rel=1e-12)
    assert warmup_cosine(warm, total, warm, floor) == pytest.approx(1.0)
    assert warmup_cosine(total, total, warm, floor) == pytest.approx(floor)


def test_scheduler_sets_the_lr_per_step():
    model = Tiny()
    opt, sched = adamw_warmup_cosine(model, CFG, 20)
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(CFG["lr"] / 4) and lrs[4] == pytest.approx(CFG["lr"])
    assert lrs[20] == pytest.approx(CFG["lr"] * 0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
