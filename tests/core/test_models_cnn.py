"""core.models.cnn.SmallCNN: shapes, input checks, and the forward against plain torch ops."""

import pytest
import torch
import torch.nn.functional as F

from core.models.cnn import SmallCNN


def test_forward_matches_functional_reference():
    torch.manual_seed(0)
    model = SmallCNN((3, 5), 7, n_classes=4).double()
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    c1, c2 = model.features[0], model.features[3]
    l1, l2 = model.head[0], model.head[2]
    h = (x - 0.2860) / 0.3530
    h = F.max_pool2d(F.relu(F.conv2d(h, c1.weight, c1.bias, padding=1)), 2)  # (6, 3, 14, 14)
    h = F.max_pool2d(F.relu(F.conv2d(h, c2.weight, c2.bias, padding=1)), 2)  # (6, 5, 7, 7)
    ref = F.linear(F.relu(F.linear(h.flatten(1), l1.weight, l1.bias)), l2.weight, l2.bias)
    out = model(x)
    assert out.shape == (6, 4)
    torch.testing.assert_close(out, ref)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        SmallCNN()(torch.rand(2, 28, 28))
    with pytest.raises(ValueError, match="channel widths"):
        SmallCNN((4,), 8)
    with pytest.raises(ValueError, match="n_classes"):
        SmallCNN((4, 4), 8, n_classes=1)
