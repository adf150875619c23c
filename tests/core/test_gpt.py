"""core.models.gpt: shapes, causality, the head weight, and input validation."""

import math

import pytest
import torch
import torch.nn.functional as F

from core.models.gpt import GPT, GPTConfig

CFG = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**CFG.__dict__, **kw})).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_shapes_and_head(tie):
    model = _model(tie_weights=tie)
    idx = torch.randint(0, CFG.vocab_size, (3, 11))
    hidden = model(idx)
    assert hidden.shape == (3, 11, CFG.n_embd)
    assert model.head_weight.shape == (CFG.vocab_size, CFG.n_embd)
    assert (model.head_weight is model.tok_emb.weight) == tie
    torch.testing.assert_close(model.logits(hidden), hidden @ model.head_weight.T)
    # final LayerNorm output: zero mean, unit variance per position (affine at init = identity)
    torch.testing.assert_close(hidden.mean(-1), torch.zeros(3, 11), atol=1e-5, rtol=0)


def test_param_count_tied_vs_untied():
    n_tied, n_untied = _model().num_params(), _model(tie_weights=False).num_params()
    assert n_untied - n_tied == CFG.vocab_size * CFG.n_embd


def test_causal_future_tokens_do_not_change_past():
    model = _model()
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.block_size))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % CFG.vocab_size
    h1, h2 = model(idx), model(changed)
    torch.testing.assert_close(h1[:, :9], h2[:, :9])
    assert not torch.allclose(h1[:, 9:], h2[:, 9:])


def test_attention_matches_explicit_masked_softmax():
    """SDPA path equals attention written out with a float64 causal mask."""
    model = _model().double()
    attn = model.blocks[0].attn
    x = torch.randn(2, 7, CFG.n_embd, dtype=torch.float64)
    q, k, v = attn.qkv(x).split(CFG.n_embd, dim=2)
    hd = CFG.n_embd // CFG.n_head
    q, k, v = (t.view(2, 7, CFG.n_head, hd).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, T, T)
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, CFG.n_embd))
    torch.testing.assert_close(attn(x), ref)


def test_initial_loss_near_uniform_and_trains():
    """At init the LM loss is ~ln V; a few Adam steps on one batch reduce it."""
    torch.manual_seed(0)
    model = GPT(CFG)
    idx = torch.randint(0, CFG.vocab_size, (4, CFG.block_size))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        logits = model.logits(model(idx[:, :-1]))
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(CFG.vocab_size)) < 0.1
    assert losses[-1] < losses[0] - 1.0


def test_bad_inputs_raise():
    model = _model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, CFG.block_size + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(vocab_size=10, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig(vocab_size=0)
