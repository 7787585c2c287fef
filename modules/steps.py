"""The Lightning steps every family shares: one batch per Trainer step, or K of them.

A Trainer step costs 0.2-0.6 ms on a 2-core CPU (hooks, progress tracking, closures; more with a
larger model), a tenth to a quarter of a 784-64-32 MLP step there and more than the whole step
on a GPU. With `steps_per_call` K (datamodules.image.TensorBatches), each Trainer step receives a
chunk of K consecutive batches and takes K optimiser steps on them, through Lightning's manual
optimisation and its wrapped optimisers, so `global_step`, precision plugins, DDP's gradient
sync and profilers see every step. The batches, their order and the updates are those of K = 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import lightning as L
import torch
from torch import Tensor

from datamodules.image import is_chunk


def first_tensor(batch) -> Tensor:
    """Images from an (images, labels) batch or a bare image batch."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class BenchModule(L.LightningModule):
    """The LightningModule every family derives from: a training step that takes one batch or a
    chunk of K, run-wide batch indices, and training logs at an exact batch cadence."""

    def __setattr__(self, name: str, value) -> None:
        # Lightning stores the running hook's name in `_current_fx_name` around every hook call:
        # about 14 times per optimiser step and 30 per Trainer step. nn.Module.__setattr__ first
        # checks whether the value is a Parameter, buffer or Module (metaclass isinstance
        # calls); a hook name never is, so it is stored directly. Measured on the 2-core CPU
        # (MLP AE, batch 128, K = 7, best of 5 interleaved): 0.893 of a plain loop with this,
        # 0.858 without.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def setup(self, stage: str) -> None:
        # A datamodule that hands out chunks needs the K-step loop, which steps the optimisers
        # itself; Lightning cannot then accumulate or clip gradients for us.
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "steps_per_call", None) is None:
            return
        trainer = self.trainer
        conflicts = []
        if trainer.accumulate_grad_batches != 1:
            conflicts.append(f"accumulate_grad_batches={trainer.accumulate_grad_batches}")
        if trainer.gradient_clip_val:
            conflicts.append(f"gradient_clip_val={trainer.gradient_clip_val}")
        if isinstance(trainer.limit_train_batches, int):  # it would count chunks, not batches
            conflicts.append(f"limit_train_batches={trainer.limit_train_batches} (a count)")
        if conflicts:
            raise ValueError(f"steps_per_call (several optimiser steps per Trainer step) cannot "
                             f"honour {', '.join(conflicts)}: set steps_per_call to null to use "
                             "them")
        self.automatic_optimization = False

    def on_train_end(self) -> None:
        # DDP broadcasts rank zero's buffers (BatchNorm's running statistics) when its forward
        # runs, once per Trainer step; each rank then updates its own on its own batches, for K
        # steps. Evaluation and the checkpoint must see one model: rank zero's, on every rank.
        if self.trainer.world_size > 1:
            for buffer in self.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def on_train_epoch_end(self) -> None:
        # Lightning steps epoch-interval schedulers itself only under automatic optimisation.
        if not self.automatic_optimization:
            schedulers = self.lr_schedulers()
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                if scheduler is not None:
                    scheduler.step()

    def training_batches(self, batch) -> Iterator[tuple[int, Tensor, bool]]:
        """(run-wide batch index, images, whether the batch ends the epoch) for each batch of a
        Trainer step: the chunk's batches, or the one batch."""
        if is_chunk(batch):
            last = len(batch) - 1
            # the epoch ends with the chunk's last batch; or earlier, by limit_train_batches
            ends = batch.ends_epoch or self.trainer.is_last_batch
            for j, (images, _) in enumerate(batch):
                yield batch.first + j, images, ends and j == last
        else:
            trainer = self.trainer
            yield trainer.fit_loop.epoch_loop.total_batch_idx, first_tensor(batch), \
                trainer.is_last_batch

    def first_batch_index(self, batch) -> int:
        """The run-wide index of a Trainer step's first (or only) batch."""
        return batch.first if is_chunk(batch) else self.trainer.fit_loop.epoch_loop.total_batch_idx

    def batches_for_steps(self, optimiser_steps: int) -> int:
        """Training batches that take this many optimiser steps: one step per batch."""
        return optimiser_steps

    def batches_trained(self) -> int:
        """Training batches done in the run, from the optimiser steps taken (global_step, which
        the checkpoint keeps)."""
        return self.batches_for_steps(self.trainer.global_step)

    def batches_left(self) -> int | None:
        """Training batches the step budget (max_steps, in optimiser steps) still allows, None
        without one: a chunk may run past the budget, and its last batches are then skipped."""
        max_steps = self.trainer.max_steps
        return None if max_steps < 0 else self.batches_for_steps(max_steps) - self.batches_trained()

    def log_training(self, terms: dict[str, Tensor], index: int, ends_epoch: bool,
                     bar: tuple[str, ...] = ("loss",)) -> None:
        """Training terms of batch `index` to the loggers every `log_every_n_steps` batches
        (x-axis: the batch index, as Lightning's own at one batch per step), and to the
        progress bar and callback metrics on those batches and on each epoch's last.

        The loggers are called directly rather than through `self.log`: with K batches in a
        Trainer step, Lightning would write at most one value per Trainer step, every
        `log_every_n_steps` Trainer steps. And each `self.log` costs about 0.5 ms on a CPU (a
        third of a small MLP's step), so it is called only on the batches that show."""
        trainer = self.trainer
        every = trainer.log_every_n_steps
        due = bool(every) and (index + 1) % every == 0
        if due and trainer.loggers:
            values = {f"train/{k}": float(v.detach()) for k, v in terms.items()}
            for logger in trainer.loggers:
                logger.log_metrics(values, step=index)
        if due or ends_epoch:
            for name, value in terms.items():
                self.log(f"train/{name}", value, prog_bar=name in bar, logger=False)


class LossSteps(BenchModule):
    """Train, validate and test on `self.losses(x)`, a dict of named loss terms whose "loss" entry
    is minimised with Adam at `hparams.lr`. Terms are logged as train/NAME, val/NAME, test/NAME;
    evaluation logs are reduced across processes under DDP."""

    def losses(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> Tensor | None:
        if self.automatic_optimization:  # Lightning steps the optimiser: one batch per call
            [(index, x, ends_epoch)] = self.training_batches(batch)
            terms = self.losses(x)
            self.log_training(terms, index, ends_epoch)
            return terms["loss"]
        optimizer = self.optimizers()
        losses = []
        for index, x, ends_epoch in islice(self.training_batches(batch), self.batches_left()):
            terms = self.losses(x)
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(terms["loss"])
            optimizer.step()
            self.log_training(terms, index, ends_epoch)
            losses.append(terms["loss"].detach())
        # Every batch's loss, for the divergence check (bench.callbacks.DivergenceGuard).
        return torch.stack(losses) if losses else None

    def validation_step(self, batch, batch_idx: int) -> None:
        terms = self.losses(first_tensor(batch))
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        terms = self.losses(first_tensor(batch))
        self.log_dict({f"test/{k}": v for k, v in terms.items()}, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
