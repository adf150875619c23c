"""Test-batch normalisation statistics (Schneider et al., 2020, arXiv:2006.16971)."""

from __future__ import annotations

from projects.tta.methods.base import METHODS, drop_running_stats
from projects.tta.methods.source import Source

__all__ = ["BatchNormAdapt"]


@METHODS.register(name="bn", paper="Schneider et al. 2020, arXiv:2006.16971")
class BatchNormAdapt(Source):
    """BatchNorm with test-batch statistics, nothing learnt (Schneider et al., 2020).

    The running buffers are removed, so batch statistics are used in train and eval mode.
    GroupNorm/LayerNorm layers are batch-agnostic, so on a GN model this equals ``source``.
    """

    needs_norm = True

    def configure_model(self) -> None:
        self.model.eval()
        drop_running_stats(self.model)  # BatchNorm without buffers normalises by the batch
