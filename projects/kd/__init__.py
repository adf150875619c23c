"""Knowledge distillation: divergences for offline/online KD on Fashion-MNIST and token-level KD of a GPT."""
