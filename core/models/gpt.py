"""A small GPT that returns hidden states, so the loss can be fused with the LM head.

``GPT.forward(idx)`` returns the final-LayerNorm hidden states ``(B, T, D)``; the classifier is
``GPT.head_weight`` ``(V, D)``. Losses that never materialise the ``(B*T, V)`` logits (Cut
Cross-Entropy: Wijmans et al. 2024, arXiv:2411.09009) take ``(hidden, head_weight, targets)``;
``GPT.logits(hidden)`` is the materialised path. Architecture: GPT-2 (Radford et al. 2019,
"Language Models are Unsupervised Multitask Learners") with pre-LN blocks, as in nanoGPT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig"]


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a :class:`GPT`; ``tie_weights`` shares the token embedding with the head."""

    vocab_size: int
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # 3 x (B, T, D)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D/H)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer: token + learned position embeddings, pre-LN blocks, final LN.

    ``forward(idx (B, T) int64) -> hidden (B, T, D)``; ``head_weight`` is the ``(V, D)``
    classifier (the token embedding when ``tie_weights``), so
    ``linear_cross_entropy(hidden, model.head_weight, targets)`` trains it without logits.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = None if cfg.tie_weights else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def head_weight(self) -> torch.Tensor:
        """The ``(V, D)`` classifier weight (tied to ``tok_emb.weight`` when configured)."""
        return self.tok_emb.weight if self.head is None else self.head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(B, T, D)`` after the final LayerNorm, for token ids ``idx (B, T)``."""
        if idx.ndim != 2 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"idx must be an integer (B, T) tensor, got {idx.dtype} {tuple(idx.shape)}"
            )
        seq_len = idx.shape[1]
        if seq_len > self.cfg.block_size:
            raise ValueError(f"sequence length {seq_len} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(seq_len, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Materialised logits ``(..., V)`` from hidden states ``(..., D)``."""
        return F.linear(hidden, self.head_weight)

    def num_params(self) -> int:
        """Parameter count (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())
