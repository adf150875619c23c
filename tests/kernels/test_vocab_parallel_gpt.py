"""Training the cce GPT with its LM head vocabulary-parallel on 2 gloo processes matches one
process step for step (float64): each rank holds an uneven shard of the (untied) head and its
AdamW state, the transformer body is replicated and receives the full gradient through the
fused loss's all-reduced dE, so no other synchronisation is needed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from core.losses import linear_cross_entropy
from core.models.gpt import GPT, GPTConfig
from tests.kernels.dist_helpers import run_ranks, shard_bounds

pytestmark = pytest.mark.slow

CFG = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_weights=False)
STEPS = 4


def train(rank: int, world: int) -> dict:
    """``STEPS`` AdamW steps on one token batch; this rank holds its shard of the head rows."""
    torch.manual_seed(0)
    model = GPT(CFG).double()
    lo, hi = shard_bounds(CFG.vocab_size, world, rank)
    head = torch.nn.Parameter(model.head.weight.detach()[lo:hi].clone())  # (V_r, D)
    body = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    opt = torch.optim.AdamW([*body, head], lr=3e-3, weight_decay=0.1)
    group = dist.group.WORLD if world > 1 else None
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG.vocab_size, (3, CFG.block_size), generator=g)  # (B, T)
    losses = []
    for _ in range(STEPS):
        hidden = model(tokens)  # (B, T, D)
        loss = linear_cross_entropy(
            hidden, head, tokens, shift=True, z_loss=1e-4, label_smoothing=0.05,
            process_group=group,
        )  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    return {"losses": losses, "body": state, "head": head.detach()}


def test_gpt_head_vocab_parallel_training_matches_one_process():
    one = train(0, 1)
    two = run_ranks(train, 2)
    assert one["losses"][-1] < one["losses"][0]  # it trains
    for rank in range(2):
        assert two[rank]["losses"] == pytest.approx(one["losses"], rel=1e-11)
        for name, want in one["body"].items():
            torch.testing.assert_close(two[rank]["body"][name], want, rtol=1e-9, atol=1e-11)
    head = torch.cat([two[0]["head"], two[1]["head"]])
    torch.testing.assert_close(head, one["head"], rtol=1e-9, atol=1e-11)
