"""What every family shares: the LightningModule base that runs both under the harness's Fabric
loop (bench run) and under lightning.Trainer (bench fit).

A training, validation or test step returns its named terms ("loss" among them). Under a
Trainer the module also logs them with `self.log_dict`, and Lightning keeps the cadence; under
the harness's loop the loop logs the returned terms at its own cadence, since under Fabric each
`self.log` would go straight to the loggers on every batch.
"""

from __future__ import annotations

from typing import ClassVar

import lightning as L
import torch
from torch import Tensor

from modules.family import Family, register


# The figures a regression check judges, by what a family is trained for (its
# `Family.judged_metrics`); every other figure of its rows is descriptive: shown, never failing. One
# figure per objective: a compare adjusts its p-values for the number it judges (Holm), so a
# second figure of the same quantity (PSNR is a log of the same squared error, SSIM follows it;
# KID and FID compare the same two feature sets) adds no evidence and takes power from the rest.
RECONSTRUCTION_FIGURES = ("recon_mse",)
# Fidelity and diversity (Kynkaanniemi et al. 2019) beside FID, for the families trained to
# sample. The AE's and the SAE's samples come from a mixture fitted to their codes after
# training, so their sample figures are descriptive.
SAMPLE_FIGURES = ("fid", "precision", "recall")


def first_tensor(batch) -> Tensor:
    """Images from an (images, labels) batch or a bare image batch."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class BenchModule(L.LightningModule):
    """The LightningModule every family derives from. A subclass that sets `family` is a family
    and is registered under its name (modules/family.py says what each capability needs);
    every constructor takes `seed`, the run's seed, for draws the module makes itself."""

    family: ClassVar[Family]
    # Under DDP, whether some parameters get no gradient at some backward (see modules/gan.py).
    ddp_find_unused_parameters: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:
            register(cls)

    def training_images_needed(self) -> dict[str, int]:
        """Training images it needs at least, by the setting that asks for them (preflight
        checks them before anything trains); none beyond a batch here."""
        return {}

    def sample_provenance(self) -> dict[str, float]:
        """Columns beside the sample figures that say what they were made with beyond the
        evaluation settings (a GAN's generator EMA); none here."""
        return {}

    def own_metrics(self, batches) -> dict[str, float]:
        """The family's own figures (`Family.metrics`) on the test split's batches; none here."""
        return {}

    def log_terms(self, stage: str, terms: dict[str, Tensor], **kwargs) -> None:
        """`stage/NAME` for each term through Lightning's logging, under a Trainer only."""
        if self.fabric is None and self._attached_to_trainer():
            self.log_dict({f"{stage}/{k}": v for k, v in terms.items()}, **kwargs)

    def _attached_to_trainer(self) -> bool:
        try:
            self.trainer  # noqa: B018 - raises RuntimeError when no Trainer is attached
        except RuntimeError:
            return False
        return True

    def world_size(self) -> int:
        """Processes that train this module: the Fabric's or the Trainer's, 1 when alone."""
        if self.fabric is not None:
            return self.fabric.world_size
        return self.trainer.world_size if self._attached_to_trainer() else 1

    def finish_training(self, datamodule) -> None:
        """What follows the last training batch, before evaluation and the final checkpoint
        (the harness's loop calls it; under a Trainer, `on_train_end`). DDP broadcasts rank
        zero's buffers (BatchNorm's running statistics) at each forward, and each rank then
        updates its own on its last batch: evaluation must see one model, rank zero's."""
        if self.world_size() > 1:
            for buffer in self.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def on_train_end(self) -> None:
        self.finish_training(getattr(self.trainer, "datamodule", None))


class FitsLatentDensity(BenchModule):
    """A family that samples from a density fitted to its codes after training (the
    autoencoder's mixture, the VQ-VAE's code prior): `fit_latent_density(batches)` runs on the
    training split once the BatchNorm statistics are the same on every rank, in the split's
    fixed order where the datamodule has one, so that the fit does not depend on the epoch."""

    def fit_latent_density(self, batches) -> None:
        raise NotImplementedError

    def finish_training(self, datamodule) -> None:
        super().finish_training(datamodule)
        if datamodule is not None:
            ordered = getattr(datamodule, "ordered_train_dataloader", datamodule.train_dataloader)
            self.fit_latent_density(ordered())


class LossSteps(BenchModule):
    """Train, validate and test on `self.losses(x)`, a dict of named loss terms whose "loss" entry
    is minimised with Adam at `hparams.lr` (Lightning's automatic optimisation). Evaluation logs
    are reduced across processes under DDP."""

    def losses(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        terms = self.losses(first_tensor(batch))
        self.log_terms("train", terms, prog_bar=True)
        return terms

    def validation_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        terms = self.losses(first_tensor(batch))
        self.log_terms("val", terms, sync_dist=True)
        return terms

    def test_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        terms = self.losses(first_tensor(batch))
        self.log_terms("test", terms, sync_dist=True)
        return terms

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
