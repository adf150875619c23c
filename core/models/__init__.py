"""Small reusable networks: a GPT for the LM projects, a BN/GN ResNet and a small CNN for 28x28 images."""

from core.models.cnn import SmallCNN
from core.models.gpt import GPT, GPTConfig
from core.models.resnet import ResNet

__all__ = ["GPT", "GPTConfig", "ResNet", "SmallCNN"]
