"""The Lightning steps shared by the families that train on one loss (AE, SAE, VAE)."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor


def first_tensor(batch) -> Tensor:
    """Images from an (images, labels) batch or a bare image batch."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class LossSteps(L.LightningModule):
    """Train, validate and test on `self.losses(x)`, a dict of named loss terms whose "loss" entry
    is minimised with Adam at `hparams.lr`. Terms are logged as train/NAME, val/NAME, test/NAME;
    evaluation logs are reduced across processes under DDP."""

    def losses(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> Tensor:
        terms = self.losses(first_tensor(batch))
        self.log_dict({f"train/{k}": v for k, v in terms.items()})
        self.log("loss", terms["loss"], prog_bar=True, logger=False)
        return terms["loss"]

    def validation_step(self, batch, batch_idx: int) -> None:
        terms = self.losses(first_tensor(batch))
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        terms = self.losses(first_tensor(batch))
        self.log_dict({f"test/{k}": v for k, v in terms.items()}, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
