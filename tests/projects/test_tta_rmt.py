"""RMT's update rule against a hand computation: symmetric CE to the teacher, SupCon pull to the
nearest source prototype, teacher EMA, source replay, warm-up, prototypes."""

import pytest
import torch
import torch.nn.functional as F

from projects.tta.methods import build
from tests.projects.tta_helpers import (
    K,
    assert_params,
    forward,
    images,
    leaves,
    params,
    tiny_model,
)

LR, EMA, TAU, WIDTH, SRC_BS = 0.2, 0.6, 0.5, 5, 6
LAMBDAS = {"lambda_ce_trg": 1.0, "lambda_cont": 0.7, "lambda_ce_src": 0.5}
pytestmark = pytest.mark.usefixtures("one_thread")


def source():
    return images(12, seed=7), torch.arange(12) % K


def _rmt(model, **kw):
    torch.manual_seed(0)  # the projector's initialisation
    hp = dict(optimizer="sgd", lr=LR, momentum=0.0, ema=EMA, temperature=TAU)
    hp.update(projection_dim=WIDTH, source_batch_size=SRC_BS, **LAMBDAS)
    return build("rmt", model, source_data=source(), **{**hp, **kw})


def sce(a, b):
    """0.5 CE(p_b, p_a) + 0.5 CE(p_a, p_b), CE(p, q) = -sum p log q (Doebler et al., eq. 3)."""
    ce = lambda p, q: -(p.softmax(1) * q.log_softmax(1)).sum(1)  # noqa: E731
    return 0.5 * ce(b, a) + 0.5 * ce(a, b)


def supcon(z, tau):
    """Khosla et al. eq. 2, anchor by anchor; positives are the other views of the sample."""
    n, v, _ = z.shape
    z = F.normalize(z, dim=2).reshape(n * v, -1)  # sample-major: row i is sample i // v
    losses = []
    for a in range(n * v):
        others = [j for j in range(n * v) if j != a]
        logits = z[a] @ z[others].T / tau
        log_prob = logits - torch.logsumexp(logits, 0)
        pos = torch.tensor([j // v == a // v for j in others])
        losses.append(-log_prob[pos].mean())
    return torch.stack(losses).mean()


def project(pp, v):
    return F.relu(v @ pp["0.weight"].T + pp["0.bias"]) @ pp["2.weight"].T + pp["2.bias"]


def descend(q, loss, lr):
    names = [n for n, v in q.items() if v.requires_grad]
    grads = torch.autograd.grad(loss, [q[n] for n in names], allow_unused=True, retain_graph=True)
    out = {n: v.detach().clone() for n, v in q.items()}
    for n, g in zip(names, grads):
        if g is not None:
            out[n] = out[n] - lr * g
    return out


def test_rmt_prototypes_are_class_means_under_the_source_statistics():
    model = tiny_model()
    bn, (xs, ys) = model[2], source()
    feats = forward(params(model), xs, running=(bn.running_mean, bn.running_var))[0]
    method = _rmt(model, warmup_steps=0)
    expected = torch.stack([feats[ys == c].mean(0) for c in range(K)])
    torch.testing.assert_close(method.prototypes, expected, rtol=1e-12, atol=1e-12)
    assert method.model[2].running_mean is None  # afterwards: batch statistics in eval too


def test_rmt_step_matches_the_hand_computation():
    model, x = tiny_model(), images(10, seed=3)
    method = _rmt(model, warmup_steps=0)
    # replay the method's random draws: the augmentation, then the source replay batch
    state = method.generator.get_state()
    x_aug = method.augment(x)
    idx = torch.randint(12, (SRC_BS,), generator=method.generator)
    method.generator.set_state(state)
    theta, proj, teacher = params(method.model), params(method.projector), params(method.teacher)
    protos = method.prototypes.clone()

    qm, qp = leaves(theta, theta), leaves(proj, proj)
    feats, logits = forward(qm, x)
    feats_aug, logits_aug = forward(qm, x_aug)
    logits_t = forward(teacher, x)[1]
    cos = F.normalize(feats.detach(), dim=1) @ F.normalize(protos, dim=1).T  # (N, K)
    views = torch.stack([protos[cos.argmax(1)], feats, feats_aug], dim=1)  # (N, 3, D)
    cont = supcon(project(qp, views), TAU)
    self_training = (0.5 * sce(logits, logits_t) + 0.5 * sce(logits_aug, logits_t)).mean()
    loss = LAMBDAS["lambda_ce_trg"] * self_training + LAMBDAS["lambda_cont"] * cont
    grads_ok = descend({**qm, **{f"p.{n}": v for n, v in qp.items()}}, loss, LR)
    theta1 = {n: grads_ok[n] for n in theta}
    proj1 = {n: grads_ok[f"p.{n}"] for n in proj}
    teacher1 = {n: EMA * teacher[n] + (1 - EMA) * theta1[n] for n in theta}  # after step 1
    src_x, src_y = source()
    q1 = leaves(theta1, theta1)
    ce = F.cross_entropy(forward(q1, src_x[idx])[1], src_y[idx])
    theta2 = descend(q1, LAMBDAS["lambda_ce_src"] * ce, LR)

    out = method(x)
    torch.testing.assert_close(out, (logits + logits_t).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(method.last_loss, loss.detach(), rtol=1e-12, atol=0)
    assert_params(method.model, theta2)
    assert_params(method.projector, proj1)
    assert_params(method.teacher, teacher1)
    # every term moves the student by far more than the tolerance
    for drop in (self_training, cont):
        alt = descend({**qm, **{f"p.{n}": v for n, v in qp.items()}}, loss - drop, LR)
        assert max((alt[n] - theta1[n]).abs().max() for n in theta) > 1e-3


def test_rmt_warmup_ramps_the_lr_and_updates_the_teacher():
    """Warm-up step i on a source batch: lr (i + 1) / W, SCE to the teacher, then the EMA."""
    model, steps = tiny_model(), 3
    gen = torch.Generator().manual_seed(0)  # the method's generator, seed 0
    src_x, _ = source()
    theta = params(model)
    teacher = dict(theta)
    for i in range(steps):
        xs = src_x[torch.randint(12, (SRC_BS,), generator=gen)]
        q = leaves(theta, theta)
        loss = sce(forward(q, xs)[1], forward(teacher, xs)[1]).mean()
        theta = descend(q, loss, LR * (i + 1) / steps)
        teacher = {n: EMA * teacher[n] + (1 - EMA) * theta[n] for n in theta}
    method = _rmt(model, warmup_steps=steps)
    assert_params(method.model, theta)
    assert_params(method.teacher, teacher)
    assert [g["lr"] for g in method.optimizer.param_groups] == [LR]
