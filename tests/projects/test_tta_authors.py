"""Our TTA methods against the authors' released code, step for step (issue #16, item 8).

The authors' update rules are transcribed below from their repositories (function bodies kept,
comments shortened), and both run on the same ResNet, batch and optimizer in float64:
- Tent: DequanWang/tent, tent.py (MIT licence, Copyright (c) 2021 Dequan Wang and Evan
  Shelhamer): configure_model, collect_params, softmax_entropy, forward_and_adapt.
- EATA: mr-eggplant/EATA, eata.py (forward_and_adapt_eata, update_model_probs) and main.py
  (the Fisher loop).
- SAR: mr-eggplant/SAR, sar.py (configure_model, collect_params, forward_and_adapt_sar) and
  sam.py (SAM, from davda54/sam).
- DeYO: Jhyun17/DeYO, methods/deyo.py (forward_and_adapt_deyo, patch augmentation), with
  einops' two ``rearrange`` patterns written as the equivalent reshape/permute.
"""

import copy
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from core.models.resnet import ResNet
from projects.tta.methods import build

# --- DequanWang/tent, tent.py ------------------------------------------------------------------


def tent_softmax_entropy(x: torch.Tensor) -> torch.Tensor:
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


@torch.enable_grad()
def tent_forward_and_adapt(x, model, optimizer):
    outputs = model(x)
    loss = tent_softmax_entropy(outputs).mean(0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return outputs


def tent_collect_params(model):
    params, names = [], []
    for nm, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            for np_, p in m.named_parameters():
                if np_ in ["weight", "bias"]:
                    params.append(p)
                    names.append(f"{nm}.{np_}")
    return params, names


def tent_configure_model(model):
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return model


# --- mr-eggplant/EATA, eata.py and main.py ----------------------------------------------------


def eata_update_model_probs(current_model_probs, new_probs):
    if current_model_probs is None:
        if new_probs.size(0) == 0:
            return None
        with torch.no_grad():
            return new_probs.mean(0)
    if new_probs.size(0) == 0:
        with torch.no_grad():
            return current_model_probs
    with torch.no_grad():
        return 0.9 * current_model_probs + (1 - 0.9) * new_probs.mean(0)


@torch.enable_grad()
def eata_forward_and_adapt(x, model, optimizer, fishers, e_margin, current_model_probs,
                           fisher_alpha, d_margin):  # fmt: skip
    outputs = model(x)
    entropys = tent_softmax_entropy(outputs)
    filter_ids_1 = torch.where(entropys < e_margin)
    ids1 = filter_ids_1
    ids2 = torch.where(ids1[0] > -0.1)
    entropys = entropys[filter_ids_1]
    if current_model_probs is not None:
        cosine_similarities = F.cosine_similarity(
            current_model_probs.unsqueeze(dim=0), outputs[filter_ids_1].softmax(1), dim=1
        )
        filter_ids_2 = torch.where(torch.abs(cosine_similarities) < d_margin)
        entropys = entropys[filter_ids_2]
        ids2 = filter_ids_2
        updated_probs = eata_update_model_probs(
            current_model_probs, outputs[filter_ids_1][filter_ids_2].softmax(1)
        )
    else:
        updated_probs = eata_update_model_probs(
            current_model_probs, outputs[filter_ids_1].softmax(1)
        )
    coeff = 1 / (torch.exp(entropys.clone().detach() - e_margin))
    entropys = entropys.mul(coeff)
    loss = entropys.mean(0)
    if fishers is not None:
        ewc_loss = 0
        for name, param in model.named_parameters():
            if name in fishers:
                ewc_loss += (
                    fisher_alpha * (fishers[name][0] * (param - fishers[name][1]) ** 2).sum()
                )
        loss += ewc_loss
    if x[ids1][ids2].size(0) != 0:
        loss.backward()
        optimizer.step()
    optimizer.zero_grad()
    return outputs, updated_probs


def eata_fishers(subnet, fisher_batches):
    """main.py: squared gradients of CE to the model's own predictions, averaged over batches."""
    fishers = {}
    params, _ = tent_collect_params(subnet)
    ewc_optimizer = torch.optim.SGD(params, 0.001)
    for iter_, images in enumerate(fisher_batches, start=1):
        outputs = subnet(images)
        _, targets = outputs.max(1)
        loss = nn.CrossEntropyLoss()(outputs, targets)
        loss.backward()
        for name, param in subnet.named_parameters():
            if param.grad is not None:
                if iter_ > 1:
                    fisher = param.grad.data.clone().detach() ** 2 + fishers[name][0]
                else:
                    fisher = param.grad.data.clone().detach() ** 2
                if iter_ == len(fisher_batches):
                    fisher = fisher / iter_
                fishers.update({name: [fisher, param.data.clone().detach()]})
        ewc_optimizer.zero_grad()
    return fishers


# --- mr-eggplant/SAR, sam.py and sar.py ---------------------------------------------------------


class SAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self):
        shared_device = self.param_groups[0]["params"][0].device
        return torch.norm(
            torch.stack(
                [
                    ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad)
                    .norm(p=2)
                    .to(shared_device)
                    for group in self.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )


def sar_configure_model(model):
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            m.requires_grad_(True)
    return model


def sar_collect_params(model):
    params = []
    for nm, m in model.named_modules():
        if any(k in nm for k in ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")):
            continue
        if nm in ["norm"]:
            continue
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            for np_, p in m.named_parameters():
                if np_ in ["weight", "bias"]:
                    params.append(p)
    return params


@torch.enable_grad()
def sar_forward_and_adapt(x, model, optimizer, margin, reset_constant, ema):
    optimizer.zero_grad()
    outputs = model(x)
    entropys = tent_softmax_entropy(outputs)
    filter_ids_1 = torch.where(entropys < margin)
    entropys = entropys[filter_ids_1]
    loss = entropys.mean(0)
    loss.backward()
    optimizer.first_step(zero_grad=True)
    entropys2 = tent_softmax_entropy(model(x))
    entropys2 = entropys2[filter_ids_1]
    filter_ids_2 = torch.where(entropys2 < margin)
    loss_second = entropys2[filter_ids_2].mean(0)
    if not np.isnan(loss_second.item()):
        ema = loss_second.item() if ema is None else 0.9 * ema + (1 - 0.9) * loss_second.item()
    loss_second.backward()
    optimizer.second_step(zero_grad=True)
    reset_flag = ema is not None and ema < 0.2
    return outputs, ema, reset_flag


# --- Jhyun17/DeYO, methods/deyo.py ---------------------------------------------------------------


@torch.enable_grad()
def deyo_forward_and_adapt(x, model, args, optimizer, deyo_margin, margin):
    outputs = model(x)
    optimizer.zero_grad()
    entropys = tent_softmax_entropy(outputs)
    filter_ids_1 = torch.where(entropys < deyo_margin)
    entropys = entropys[filter_ids_1]
    if len(entropys) == 0:
        return outputs, 0, 0
    x_prime = x[filter_ids_1].detach()
    side = (x.shape[-1] // args.patch_len) * args.patch_len
    resize_t = torchvision.transforms.Resize((side, side))
    resize_o = torchvision.transforms.Resize((x.shape[-1], x.shape[-1]))
    x_prime = resize_t(x_prime)
    b, c, hh, ww = x_prime.shape  # einops: 'b c (ps1 h) (ps2 w) -> b (ps1 ps2) c h w'
    ps = args.patch_len
    x_prime = x_prime.reshape(b, c, ps, hh // ps, ps, ww // ps).permute(0, 2, 4, 1, 3, 5)
    x_prime = x_prime.reshape(b, ps * ps, c, hh // ps, ww // ps)
    perm_idx = torch.argsort(torch.rand(x_prime.shape[0], x_prime.shape[1]), dim=-1)
    x_prime = x_prime[torch.arange(x_prime.shape[0]).unsqueeze(-1), perm_idx]
    # einops: 'b (ps1 ps2) c h w -> b c (ps1 h) (ps2 w)'
    x_prime = x_prime.reshape(b, ps, ps, c, hh // ps, ww // ps).permute(0, 3, 1, 4, 2, 5)
    x_prime = resize_o(x_prime.reshape(b, c, hh, ww))
    with torch.no_grad():
        outputs_prime = model(x_prime)
    prob_outputs = outputs[filter_ids_1].softmax(1)
    prob_outputs_prime = outputs_prime.softmax(1)
    cls1 = prob_outputs.argmax(dim=1)
    plpd = torch.gather(prob_outputs, dim=1, index=cls1.reshape(-1, 1)) - torch.gather(
        prob_outputs_prime, dim=1, index=cls1.reshape(-1, 1)
    )
    plpd = plpd.reshape(-1)
    filter_ids_2 = torch.where(plpd > args.plpd_threshold)
    entropys = entropys[filter_ids_2]
    final_backward = len(entropys)
    if final_backward == 0:
        return outputs, len(filter_ids_1[0]), 0
    plpd = plpd[filter_ids_2]
    coeff = args.reweight_ent * (1 / (torch.exp(entropys.clone().detach() - margin))) + (
        args.reweight_plpd * (1 / (torch.exp(-1.0 * plpd.clone().detach())))
    )
    entropys = entropys.mul(coeff)
    loss = entropys.mean(0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return outputs, len(filter_ids_1[0]), final_backward


# --- the comparisons ---------------------------------------------------------------------------


def source_resnet(norm: str) -> nn.Module:
    """A float64 ResNet whose BN running statistics are far from any batch's (a model that
    used them by mistake would differ at once)."""
    torch.manual_seed(0)
    model = ResNet(norm=norm, width=8).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(0.5)
            m.running_var.fill_(3.0)
    return model.eval()


def batches(n: int, size: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(size, 1, 28, 28, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_tent_matches_the_authors_code(lr):
    """Tent (Adam, the authors' CIFAR-10-C config) on a BN ResNet: the same logits and the
    same affine parameters after every one of 4 steps, to float64 rounding."""
    model = source_resnet("bn")
    theirs = tent_configure_model(copy.deepcopy(model))
    params, _ = tent_collect_params(theirs)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    ours = build("tent", model, optimizer="adam", lr=lr)
    for x in batches(4, 32):
        expected = tent_forward_and_adapt(x, theirs, opt)
        torch.testing.assert_close(ours(x), expected.detach(), rtol=0, atol=1e-12)
        for (name, p), q in zip(ours.model.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)


def confident(model: nn.Module, scale: float) -> nn.Module:
    """The classifier head scaled up, so entropies spread over (0, ln K) and filters bite."""
    with torch.no_grad():
        model.fc.weight.mul_(scale)
        model.fc.bias.mul_(scale)
    return model


def varied_batches(n: int, size: int) -> list[torch.Tensor]:
    """Images with per-sample brightness and contrast, so predictions differ between samples."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        base = torch.rand(size, 1, 28, 28, generator=g, dtype=torch.float64)
        gain = torch.rand(size, 1, 1, 1, generator=g, dtype=torch.float64)
        out.append(
            (
                base * gain
                + (1 - gain) * torch.rand(size, 1, 1, 1, generator=g, dtype=torch.float64)
            ).clamp(0, 1)
        )
    return out


def assert_same_params(ours: nn.Module, theirs: nn.Module, atol: float = 1e-12) -> None:
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=name)


def test_eata_matches_the_authors_code():
    """EATA (alpha 1, Adam 1e-3 as in the benchmark; d_margin 0.9 so that the EMA of the mean
    probabilities is updated on these look-alike images) on a BN
    ResNet with the Fisher of main.py: the same logits, filters and parameters per step."""
    model = confident(source_resnet("bn"), 8.0)
    fisher_x = torch.rand(
        128, 1, 28, 28, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    e0 = 0.4 * math.log(10)
    theirs = tent_configure_model(copy.deepcopy(model))
    fishers = eata_fishers(theirs, list(fisher_x.split(64)))
    params, _ = tent_collect_params(theirs)
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
    ours = build("eata", model, e_margin=0.4, d_margin=0.9, fisher_alpha=1.0, fisher_data=fisher_x)
    probs, kept = None, 0
    for x in varied_batches(4, 48):
        expected, probs = eata_forward_and_adapt(x, theirs, opt, fishers, e0, probs, 1.0, 0.9)
        torch.testing.assert_close(ours(x), expected.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.mean_probs, probs, rtol=0, atol=1e-12)
        kept += ours.last_loss is not None
        assert_same_params(ours.model, theirs)
    assert kept > 0  # some batches did update


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sar_matches_the_authors_code(optimizer):
    """SAR on a GN ResNet (SAM over SGD momentum 0.9 as in the authors' code, or over Adam as
    in params.yaml): the same logits and parameters after every step, up to the last bits of
    the return to w (ours subtracts the perturbation, theirs restores a saved copy)."""
    model = confident(source_resnet("gn"), 4.0)  # about 3 in 4 samples reliable
    theirs = sar_configure_model(copy.deepcopy(model))
    base, kw = (
        (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9})
        if optimizer == "sgd"
        else (torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999)})
    )
    opt = SAM(sar_collect_params(theirs), base, rho=0.05, **kw)
    ours = build("sar", model, optimizer=optimizer, lr=1e-3, momentum=0.9)
    ema = None
    for x in varied_batches(4, 48):
        e0 = 0.4 * math.log(10)
        expected, ema, reset = sar_forward_and_adapt(x, theirs, opt, e0, 0.2, ema)
        assert not reset
        torch.testing.assert_close(ours(x), expected.detach(), rtol=0, atol=1e-12)
        assert ours.ema == pytest.approx(ema, abs=1e-12)
        assert_same_params(ours.model, theirs, atol=1e-12)
    assert ema is not None  # some samples were reliable


def test_sar_differs_from_the_authors_code_when_no_sample_is_reliable():
    """A known difference, kept: with no reliable sample the authors' code still calls the base
    optimizer (zero gradients from the empty mean), so SGD momentum keeps moving the weights;
    ours skips the step, as the paper's rule (update on reliable samples) says."""
    model = confident(source_resnet("gn"), 4.0)
    theirs = sar_configure_model(copy.deepcopy(model))
    opt = SAM(sar_collect_params(theirs), torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9)
    ours = build("sar", model, optimizer="sgd", lr=1e-3, momentum=0.9)
    first, second = varied_batches(2, 48)
    e0 = 0.4 * math.log(10)
    sar_forward_and_adapt(first, theirs, opt, e0, 0.2, None)
    ours(first)
    assert_same_params(ours.model, theirs)
    ours.e_margin = 0.0  # nothing is reliable now
    with torch.no_grad():
        before = [p.clone() for p in ours.model.parameters()]
    sar_forward_and_adapt(second, theirs, opt, 0.0, 0.2, None)
    ours(second)
    assert all(torch.equal(p, q) for p, q in zip(ours.model.parameters(), before))
    moved = [not torch.equal(p, q) for p, q in zip(theirs.parameters(), before)]
    assert any(moved)


def test_deyo_matches_the_authors_code():
    """DeYO (4x4 patch shuffle, PLPD filter and weights, SGD momentum 0.9) on a GN ResNet: the
    same shuffled views (the same random draws), logits and parameters after every step."""
    model = confident(source_resnet("gn"), 3.5)
    theirs = sar_configure_model(copy.deepcopy(model))  # DeYO's configure_model is SAR's
    opt = torch.optim.SGD(sar_collect_params(theirs), 1e-3, momentum=0.9)
    args = types.SimpleNamespace(patch_len=4, plpd_threshold=0.05, reweight_ent=1, reweight_plpd=1)
    ours = build("deyo", model, optimizer="sgd", lr=1e-3, momentum=0.9, plpd_threshold=0.05, seed=7)
    torch.manual_seed(7)  # their permutations come from the global generator, ours from seed 7
    updates = 0
    for x in varied_batches(4, 48):
        log_k = math.log(10)
        expected, _, final = deyo_forward_and_adapt(x, theirs, args, opt, 0.5 * log_k, 0.4 * log_k)
        torch.testing.assert_close(ours(x), expected.detach(), rtol=0, atol=1e-12)
        assert_same_params(ours.model, theirs)
        updates += final > 0
    assert updates > 0
