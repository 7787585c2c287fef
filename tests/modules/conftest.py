import lightning as L
import pytest
import torch

from datamodules import TensorBatches
from modules import MODELS

# Tiny nets: a test trains in well under a second per hundred steps on one CPU thread.
TINY = {"latent_dim": 8, "hidden": 32, "width": 4}
FAMILIES = list(MODELS)  # every registered family
BACKBONES = ["mlp", "conv"]
SHAPES = [(1, 28, 28), (3, 32, 32)]


def tiny_model(family: str, backbone: str = "mlp", image_shape=(1, 28, 28), **overrides):
    kwargs = {**TINY, "backbone": backbone, "image_shape": image_shape}
    return MODELS[family](**{**kwargs, **overrides})


def prototype_images(n: int, image_shape=(1, 28, 28), n_prototypes: int = 4,
                     seed: int = 0) -> torch.Tensor:
    """uint8 images that are noisy copies of a few random blocky prototypes: structure a small
    model can learn in a few hundred steps, unlike uniform noise."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = image_shape
    coarse = torch.rand(n_prototypes, c, h // 4, w // 4, generator=g)
    prototypes = coarse.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    which = torch.randint(n_prototypes, (n,), generator=g)
    noisy = prototypes[which] + 0.05 * torch.randn(n, c, h, w, generator=g)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)


def prototype_batches(n: int = 512, batch_size: int = 64, image_shape=(1, 28, 28),
                      seed: int = 0) -> TensorBatches:
    images = prototype_images(n, image_shape, seed=seed)
    return TensorBatches(images, torch.zeros(n, dtype=torch.long), batch_size, shuffle=True,
                         drop_last=True, seed=seed)


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    return L.Trainer(**{**defaults, **kwargs})


class LossHistory(L.Callback):
    """The loss each training step returned (the discriminator's for the GAN)."""

    def __init__(self) -> None:
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.values.append(float(loss))


@pytest.fixture
def unit_images():
    """Float images in [0, 1] for 1x28x28, as the datamodules give them."""
    return prototype_images(16).float() / 255
