"""Robust classification losses under label noise, with diffusion spectral entropy (Mao et al.
2023, Zhu et al. 2023, Zhang & Sabuncu 2018, Wang et al. 2019, Ghosh et al. 2017, Liao et al.
2023): an MLP on Fashion-MNIST whose training labels are corrupted, one run per (noise
condition, seed, loss). The default params file every entry point shares lives here.
"""

DEFAULT_PARAMS = "projects/robust_losses/params.yaml"  # relative to the repository root
