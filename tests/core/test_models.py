"""core.models.resnet: shapes, norm variants, bad arguments, batch (in)dependence."""

import pytest
import torch
from torch import nn

from core.models.resnet import ResNet, make_norm


@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
@pytest.mark.parametrize("stem_stride", [1, 2])
def test_shapes_and_norm_layers(norm, stem_stride):
    torch.manual_seed(0)
    model = ResNet(num_classes=7, width=4, blocks=2, norm=norm, stem_stride=stem_stride)
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 7)
    assert model.features(x).shape == (3, 16)
    torch.testing.assert_close(model.fc(model.features(x)), model(x))
    kinds = {type(m) for m in model.modules()}
    expected = {"bn": nn.BatchNorm2d, "gn": nn.GroupNorm, "none": None}[norm]
    if expected is None:
        assert not kinds & {nn.BatchNorm2d, nn.GroupNorm}
    else:
        assert expected in kinds
    n_blocks = sum(1 for m in model.modules() if type(m).__name__ == "BasicBlock")
    assert n_blocks == 6


def test_groupnorm_is_batch_independent_and_batchnorm_is_not():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    gn = ResNet(width=8, norm="gn").train()
    torch.testing.assert_close(gn(x)[:2], gn(x[:2]))
    bn = ResNet(width=8, norm="bn").train()
    assert not torch.allclose(bn(x)[:2], bn(x[:2]))


def test_make_norm_groups_and_errors():
    assert make_norm("gn", 4).num_groups == 4 and make_norm("gn", 32).num_groups == 8
    with pytest.raises(ValueError, match="norm must be"):
        make_norm("ln", 8)
    with pytest.raises(ValueError, match="norm must be"):
        ResNet(norm="batch")
