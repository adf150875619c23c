"""FSDP for the GPT of cce and of kd's LM stage: the strategy built from ``trainer.strategy: fsdp`` wraps exactly the
transformer blocks (the root unit keeps the embeddings, the tied head and the final norm), keeps
the original parameters and no activation checkpointing. Training under FSDP needs GPUs (torch's
FSDP refuses CPU-only hosts), so the 1-vs-FSDP parity run is skipped without 2 CUDA devices."""

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from core.engine.trainer import strategy
from core.models.gpt import GPT, Block, GPTConfig
from projects.cce.train import LMModule
from projects.kd.lm_modules import LMDistill

TINY = GPTConfig(vocab_size=67, block_size=16, n_layer=3, n_head=2, n_embd=24)


def test_fsdp_strategy_from_params_wraps_the_blocks():
    s = strategy({"strategy": "fsdp", "accelerator": "gpu", "devices": 2}, fsdp_wrap={Block})
    assert isinstance(s, FSDPStrategy)
    assert s.kwargs["use_orig_params"] is True
    assert not s._activation_checkpointing_kwargs  # off by default
    policy = s.kwargs["auto_wrap_policy"]
    if isinstance(policy, set):  # Lightning turns the set into a ModuleWrapPolicy on wrap
        policy = ModuleWrapPolicy(policy)
    model = GPT(TINY)
    units = policy._run_policy(model, ignored_modules=set(), root_kwargs={})
    wrapped = [m for m in units if m is not model]
    assert len(wrapped) == TINY.n_layer and all(isinstance(m, Block) for m in wrapped)
    assert set(map(id, wrapped)) == set(map(id, model.blocks))
    # tied head: one parameter, in the root unit with the embeddings (no cross-unit sharing)
    assert model.head_weight is model.tok_emb.weight
    block_params = {id(p) for b in model.blocks for p in b.parameters()}
    assert id(model.head_weight) not in block_params


def test_other_strategies_are_lightnings_and_fsdp_needs_wrap_classes():
    assert strategy({"strategy": "ddp"}) == "ddp"
    assert strategy({}) == "auto"
    with pytest.raises(ValueError, match="fsdp_wrap"):
        strategy({"strategy": "fsdp"})


@pytest.mark.parametrize("module", [LMModule, LMDistill], ids=["cce", "kd"])
def test_gpt_modules_are_sharding_aware(module):
    """Both GPT modules choose decay groups with full shapes and clip through the FSDP root
    (core.engine.trainer.ShardingAware), not Lightning's refusing default."""
    from core.engine.trainer import ShardingAware

    assert issubclass(module, ShardingAware)
    assert module.configure_gradient_clipping is ShardingAware.configure_gradient_clipping


def test_lightning_and_torch_refuse_fsdp_on_cpu():
    """Why there is no CPU run: Lightning refuses FSDP with accelerator cpu."""
    import lightning as L

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(
            accelerator="cpu", devices=2, strategy=strategy({"strategy": "fsdp"}, fsdp_wrap={Block})
        )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 CUDA devices")
def test_fsdp_two_gpus_train_as_one(tmp_path):  # pragma: no cover - GPU hosts only
    from tests.projects.test_cce_dist import _data, _train

    data = _data(tmp_path)
    gpu = ("--set", "trainer.accelerator=gpu")
    one, _ = _train(tmp_path / "one", data, *gpu)
    two, writes = _train(
        tmp_path / "fsdp",
        data,
        *gpu,
        "--set",
        "trainer.devices=2",
        "--set",
        "trainer.strategy=fsdp",
    )
    for split in ("train", "val"):
        a = [v for _, v in one["history"][split]]
        b = [v for _, v in two["history"][split]]
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=0)
    assert {line.split()[0] for line in writes} == {"0"}
