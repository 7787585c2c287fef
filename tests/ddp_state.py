"""Run as `python -m tests.ddp_state OUT`: state that training keeps outside the gradients, on two
CPU processes (gloo) through the harness's DDP strategy (tests/bench/test_distributed.py checks
what rank 0 saves in the folder OUT):

- a GAN with spectral norm on both nets, each rank on its own data, after rank 1's
  power-iteration vectors were knocked off rank 0's: every rank's vectors (`vectors.pt`), which
  must end equal;
- a VQ-VAE with the EMA codebook, its data initialisation and restarts, each rank on its half
  of `vqvae_batches()`: its state dict (`vqvae.pt`), which must equal one process's on the
  whole batches (`train_vqvae`)."""

import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch

from bench.loop import ManualStepDDP
from modules import MODELS


def power_iteration_vectors(model) -> torch.Tensor:
    """Every spectrally normalised layer's u and v, flattened into one vector."""
    return torch.cat([b.flatten() for name, b in model.named_buffers()
                      if name.endswith(("._u", "._v"))])


def vqvae_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(8, 1, 28, 28, generator=g) for _ in range(6)]


def train_vqvae(fabric=None, shard=slice(None)):
    """The VQ-VAE after a step on each of `vqvae_batches()`, each process on `shard` of every
    batch (the rows a process holds)."""
    torch.manual_seed(0)
    # 8 codes of 2 numbers, 2 positions an image: restarts (decay 0.5, below 0.3: a code unused
    # for two steps) find dead codes in these few steps
    model = MODELS["vqvae"](backbone="mlp", hidden=16, latent_dim=4, code_dim=2,
                            codebook_size=8, decay=0.5, restart_below=0.3)
    restarted = []
    restart = model._restart
    model._restart = lambda dead, vectors: (restarted.append(len(dead)), restart(dead, vectors))
    optimizer = model.configure_optimizers()
    backward = (lambda loss: loss.backward()) if fabric is None else fabric.backward
    if fabric is not None:
        model, optimizer = fabric.setup(model, optimizer)
    for index, batch in enumerate(vqvae_batches()):
        backward(model.training_step(batch[shard], index)["loss"])
        optimizer.step()
        optimizer.zero_grad()
    assert restarted, "no code was restarted: the test would not see the gather"
    return model


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
        torch.save(gathered, Path(out) / "vectors.pt")
    rank = fabric.global_rank
    vqvae = train_vqvae(fabric, slice(rank * 4, (rank + 1) * 4))
    if rank == 0:
        torch.save(vqvae.state_dict(), Path(out) / "vqvae.pt")


if __name__ == "__main__":
    strategy = ManualStepDDP(timeout=timedelta(seconds=60), find_unused_parameters=True,
                             start_method="spawn")
    L.Fabric(accelerator="cpu", devices=2, strategy=strategy).launch(train, sys.argv[1])
