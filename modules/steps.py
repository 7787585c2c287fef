"""The Lightning steps shared by the families that train on one loss (AE, SAE, VAE)."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor


def first_tensor(batch) -> Tensor:
    """Images from an (images, labels) batch or a bare image batch."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def logs_this_step(module: L.LightningModule) -> bool:
    """True on the training steps whose logged values Lightning writes (every
    `Trainer(log_every_n_steps=...)` steps). Each `self.log` call costs about 0.5 ms on CPU in
    Lightning 2.6 (it walks the stored result's whole state to move it to the value's device),
    which is a third of a small MLP's step, so the families log training values only on the
    steps that reach the logger, and on each epoch's last batch so that the progress bar and
    callbacks end with current values. Lightning exposes the first decision only on a private
    attribute."""
    trainer = module._trainer
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None:
        return True
    return bool(connector.should_update_logs or trainer.is_last_batch)


class BenchModule(L.LightningModule):
    """The LightningModule every family derives from: Lightning's own, less one per-step cost.

    The Trainer stores the running hook's name in `module._current_fx_name` before and after every
    hook call, about 44 times per training step. nn.Module.__setattr__ first checks whether the
    value is a Parameter, buffer or Module (two metaclass isinstance calls each), which added
    about 45 us to every step on a 2-core CPU (measured with a near-empty model: 335 -> 290 us
    per Trainer step). A hook name is never any of those, so it is stored directly; every other
    attribute goes through nn.Module as usual."""

    def __setattr__(self, name: str, value) -> None:
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


class LossSteps(BenchModule):
    """Train, validate and test on `self.losses(x)`, a dict of named loss terms whose "loss" entry
    is minimised with Adam at `hparams.lr`. Terms are logged as train/NAME, val/NAME, test/NAME;
    evaluation logs are reduced across processes under DDP."""

    def losses(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> Tensor:
        terms = self.losses(first_tensor(batch))
        if logs_this_step(self):
            self.log("train/loss", terms["loss"], prog_bar=True)
            self.log_dict({f"train/{k}": v for k, v in terms.items() if k != "loss"})
        return terms["loss"]

    def validation_step(self, batch, batch_idx: int) -> None:
        terms = self.losses(first_tensor(batch))
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        terms = self.losses(first_tensor(batch))
        self.log_dict({f"test/{k}": v for k, v in terms.items()}, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
