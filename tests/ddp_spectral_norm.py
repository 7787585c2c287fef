"""Run as `python -m tests.ddp_spectral_norm OUT`: a GAN with spectral norm on both nets trains
for a few batches on two CPU processes (gloo) through the harness's DDP strategy, each rank on
its own data, after rank 1's power-iteration vectors were knocked off rank 0's; rank 0 saves
every rank's vectors to OUT (tests/bench/test_distributed.py checks that they end equal)."""

import sys
from datetime import timedelta

import lightning as L
import torch

from bench.loop import ManualStepDDP
from modules import MODELS


def power_iteration_vectors(model) -> torch.Tensor:
    """Every spectrally normalised layer's u and v, flattened into one vector."""
    return torch.cat([b.flatten() for name, b in model.named_buffers()
                      if name.endswith(("._u", "._v"))])


def train(fabric, out: str) -> None:
    torch.manual_seed(0)
    model = MODELS["gan"](backbone="mlp", hidden=16, latent_dim=4, loss="hinge",
                          spectral_norm="both", n_critic=1)
    opt_g, opt_d = model.configure_optimizers()
    model, opt_g, opt_d = fabric.setup(model, opt_g, opt_d)
    model.mark_forward_method("train_on_batch")
    torch.manual_seed(1 + fabric.global_rank)  # each rank its own data and noise
    if fabric.global_rank == 1:  # torch's power method starts from v, then u: knock both off
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name.endswith(("._u", "._v")):
                    buffer.copy_(torch.nn.functional.normalize(torch.randn_like(buffer), dim=0))
    for index in range(4):
        model.train_on_batch(torch.rand(8, 1, 28, 28), index, opt_g, opt_d, fabric.backward)
    gathered = fabric.all_gather(power_iteration_vectors(model))
    if fabric.global_rank == 0:
        torch.save(gathered, out)


if __name__ == "__main__":
    strategy = ManualStepDDP(timeout=timedelta(seconds=60), find_unused_parameters=True,
                             start_method="spawn")
    L.Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(train, sys.argv[1])
