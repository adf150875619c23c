"""CA calibrator (Liu et al. 2024): loss closed form (plain and the authors' balanced weighting),
confidence = accuracy without view information, accuracy kept, temperatures clamped, learns to
separate correct from wrong predictions via view agreement, views helper."""

import io

import pytest
import torch
import torch.nn.functional as F

from core.calibration import CALIBRATORS, CACalibrator, correctness_aware_loss, make_views
from core.calibration.ca import VIEW_TRANSFORMS
from core.calibration.metrics import expected_calibration_error

C, V = 4, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _views(n, seed):
    """Equally confident original logits; other views agree with the original when it is correct
    and are random when it is wrong, so agreement reveals correctness."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=g)
    correct = torch.rand(n, generator=g) < 0.6
    wrong = (labels + torch.randint(1, C, (n,), generator=g)) % C
    pred = torch.where(correct, labels, wrong)
    original = 4.0 * F.one_hot(pred, C) + 0.3 * torch.randn(n, C, generator=g)
    others = []
    for _ in range(V - 1):
        random_class = torch.randint(0, C, (n,), generator=g)
        cls = torch.where(correct, pred, random_class)
        others.append(4.0 * F.one_hot(cls, C) + 0.3 * torch.randn(n, C, generator=g))
    return torch.stack([original, *others]), labels


def test_loss_closed_form_and_class_balance():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [1.0, 0.0], [0.5, 0.0]])
    labels = torch.tensor([0, 1, 1, 1, 0])  # correct, correct, wrong, wrong, correct
    conf = logits.softmax(1).max(1).values
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(
        correctness_aware_loss(logits, labels), ((conf - correct) ** 2).mean()
    )
    # balanced: the authors' code weighs correct samples 1 - acc and wrong ones acc, normalised
    acc = correct.mean()
    weights = torch.where(correct.bool(), 1 - acc, acc)
    expected = (weights * (conf - correct) ** 2).sum() / weights.sum()
    torch.testing.assert_close(correctness_aware_loss(logits, labels, balanced=True), expected)
    half_each = 0.5 * ((1 - conf[correct.bool()]) ** 2).mean() + 0.5 * (conf[2:4] ** 2).mean()
    torch.testing.assert_close(expected, half_each)
    # only correct predictions: plain mean over them, balanced or not
    only = [0, 1, 4]
    for balanced in (False, True):
        torch.testing.assert_close(
            correctness_aware_loss(logits[only], labels[only], balanced=balanced),
            ((1 - conf[only]) ** 2).mean(),
        )


@pytest.mark.parametrize(("balanced", "target"), [(False, "accuracy"), (True, 0.5)])
def test_uninformative_views_give_accuracy_as_confidence(balanced, target):
    """All samples alike (same confidence, views equal to the original): the CA loss is minimised
    by a confidence equal to the accuracy (85 % here), while the balanced weighting of the
    authors' code pulls it to 0.5, its balanced-prior posterior q(1-a) / (q(1-a) + (1-q)a)."""
    g = torch.Generator().manual_seed(3)
    n = 2000
    labels = torch.randint(0, C, (n,), generator=g)
    correct = torch.rand(n, generator=g) < 0.85
    pred = torch.where(correct, labels, (labels + torch.randint(1, C, (n,), generator=g)) % C)
    logits = 2.0 * F.one_hot(pred, C).float()  # confidence 0.71 at T = 1
    views = ("identity", "rot90", "hflip")
    ca = CACalibrator(C, views=views, top_k=2, balanced=balanced).fit(
        logits.expand(len(views), -1, -1), labels
    )
    with torch.no_grad():
        conf = ca(logits.expand(len(views), -1, -1)).softmax(1).max(1).values
    expected = correct.float().mean() if target == "accuracy" else torch.tensor(target)
    torch.testing.assert_close(conf, expected.expand(n), atol=0.01, rtol=0)


def test_fit_keeps_accuracy_clamps_temperature_and_improves_calibration():
    views = ("identity", "rot90", "hflip")
    fit_logits, fit_labels = _views(1500, 0)
    test_logits, test_labels = _views(1500, 1)
    ca = CACalibrator(C, views=views, top_k=2, epochs=200).fit(fit_logits, fit_labels)
    with torch.no_grad():
        out = ca(test_logits)
        temps = ca.temperature(test_logits)
    assert torch.equal(out.argmax(1), test_logits[0].argmax(1))
    assert temps.min() >= 0.1 and temps.max() <= 10
    correct = test_logits[0].argmax(1).eq(test_labels)
    # wrong predictions (views disagree) are cooled much more than correct ones
    assert temps[~correct].median() > 2 * temps[correct].median()
    before = expected_calibration_error(test_logits[0].softmax(1), test_labels)
    after = expected_calibration_error(out.softmax(1), test_labels)
    assert after < 0.5 * before
    assert correctness_aware_loss(out, test_labels) < correctness_aware_loss(
        test_logits[0], test_labels
    )


def test_checkpoint_round_trip_and_registry():
    logits, labels = _views(200, 2)
    ca = CALIBRATORS.build("ca", C, views=("identity", "rot90", "hflip"), top_k=2, epochs=20)
    ca.fit(logits, labels)
    buffer = io.BytesIO()
    torch.save(ca.state_dict(), buffer)
    buffer.seek(0)
    fresh = CACalibrator(C, views=("identity", "rot90", "hflip"), top_k=2, seed=1)
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh(logits), ca(logits))


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (torch.randn(2, 10, C), torch.arange(10) % C, r"V=3"),
        (torch.randn(V, 10, C + 1), torch.arange(10) % C, r"C=4"),
        (torch.full((V, 10, C), float("nan")), torch.arange(10) % C, "NaN"),
        (torch.randn(V, 10, C), torch.arange(9) % C, r"labels must be \(N,\)"),
        (torch.randn(V, 10, C), torch.ones(10, dtype=torch.long), "at least 2 classes"),
    ],
)
def test_bad_input_raises(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        CACalibrator(C, views=("identity", "rot90", "hflip"), top_k=2).fit(logits, labels)
    with pytest.raises(ValueError, match="transformed view"):
        CACalibrator(C, views=("identity",))


def test_make_views_applies_each_transform():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    images = torch.rand(5, 1, 28, 28)
    views = ("identity", "rot90", "rot270", "hflip", "blur", "contrast")
    out = make_views(model, images, views=views, batch_size=2)
    assert out.shape == (len(views), 5, 10)
    with torch.no_grad():
        torch.testing.assert_close(out[1], model(images.rot90(1, (2, 3))))
        torch.testing.assert_close(out[3], model(images.flip(3)))
    blurred = VIEW_TRANSFORMS["blur"](images)
    assert blurred.shape == images.shape and blurred.std() < images.std()
    # a constant image is a fixed point of blur and contrast
    flat = torch.full((1, 1, 28, 28), 0.3)
    torch.testing.assert_close(VIEW_TRANSFORMS["blur"](flat), flat)
    torch.testing.assert_close(VIEW_TRANSFORMS["contrast"](flat), flat)
    with pytest.raises(ValueError, match="unknown views"):
        make_views(model, images, views=("identity", "colour_jitter"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"hidden": 0}, "hidden must be an integer >= 1"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"lr": float("nan")}, "lr must be"),
        ({"weight_decay": -1e-4}, "weight_decay must be a finite number >= 0"),
        ({"top_k": 0}, "top_k must be in"),
        ({"views": ("identity", "bogus")}, "unknown views"),
        ({"seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_hyperparameters_are_validated_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CACalibrator(5, **kwargs)
