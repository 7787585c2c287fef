"""Backbones shared by the four families: an MLP (784-64-32 for 28x28, the classic tutorial shape)
and a DCGAN-style conv net for 28x28 and 32x32 images with 1 or 3 channels.

Encoders map images to `out_dim` features (codes, posterior parameters or a critic score);
decoders map a latent vector to image logits (pre-sigmoid, or pre-tanh for the GAN).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.errors import UserError, check_choice

BACKBONES = ("mlp", "conv")


def check_backbone(backbone: str, image_shape: tuple[int, int, int]) -> None:
    check_choice("backbone", backbone, BACKBONES)
    channels, height, width = image_shape
    if backbone == "conv" and (height != width or height not in (28, 32)):
        raise UserError(f"the conv backbone takes 28x28 or 32x32 images, got {height}x{width}; "
                         "use backbone='mlp' for other sizes")
    if channels not in (1, 3):
        raise UserError(f"images need 1 or 3 channels, got {channels}")


def _conv_grid(image_shape: tuple[int, int, int]) -> int:
    """Side of the feature map after two stride-2 convs: 7 for 28x28, 8 for 32x32."""
    return image_shape[1] // 4


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def check_mlp_shape(backbone: str, depth: int, activation: str) -> None:
    check_choice("activation", activation, ACTIVATIONS)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise UserError(f"depth={depth!r}: give the number of hidden layers, >= 1")
    if backbone == "conv" and (depth, activation) != (1, "relu"):
        raise UserError("depth and activation shape the mlp backbone; the conv backbone is "
                         "the DCGAN one")


def mlp_encoder(image_shape: tuple[int, int, int], hidden: int, out_dim: int, depth: int = 1,
                activation: str = "relu") -> nn.Module:
    """`depth` hidden layers of `hidden` units (784-64-32 by default; Burda et al. 2016's VAE is
    784-200-200 tanh, depth 2), then a linear output."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(image_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, out_dim))


def mlp_decoder(image_shape: tuple[int, int, int], hidden: int, latent_dim: int, depth: int = 1,
                activation: str = "relu") -> nn.Module:
    layers: list[nn.Module] = []
    width = latent_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, math.prod(image_shape)),
                         nn.Unflatten(1, image_shape))


def conv_encoder(image_shape: tuple[int, int, int], width: int, out_dim: int,
                 batch_norm: bool = True) -> nn.Module:
    """DCGAN discriminator body: two 4x4 stride-2 convs with LeakyReLU(0.2), then a linear head.
    `batch_norm=False` for a WGAN-GP critic, whose penalty is per-sample (Gulrajani et al. 2017)."""
    side = _conv_grid(image_shape)
    return nn.Sequential(
        nn.Conv2d(image_shape[0], width, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, 2, 1, bias=not batch_norm),
        nn.BatchNorm2d(2 * width) if batch_norm else nn.Identity(), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(2 * width * side * side, out_dim),
    )


def conv_decoder(image_shape: tuple[int, int, int], width: int, latent_dim: int) -> nn.Module:
    """DCGAN generator: a linear projection to a 2w x s x s map, then two 4x4 stride-2
    transposed convs (s -> 2s -> 4s, i.e. 7 -> 28 or 8 -> 32) with BatchNorm and ReLU."""
    side = _conv_grid(image_shape)
    return nn.Sequential(
        nn.Linear(latent_dim, 2 * width * side * side, bias=False),
        nn.Unflatten(1, (2 * width, side, side)), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.ConvTranspose2d(width, image_shape[0], 4, 2, 1),
    )


def make_encoder(backbone: str, image_shape: tuple[int, int, int], out_dim: int, hidden: int,
                 width: int, batch_norm: bool = True, depth: int = 1,
                 activation: str = "relu") -> nn.Module:
    check_backbone(backbone, image_shape)
    check_mlp_shape(backbone, depth, activation)
    if backbone == "mlp":
        return mlp_encoder(image_shape, hidden, out_dim, depth, activation)
    return conv_encoder(image_shape, width, out_dim, batch_norm)


def make_decoder(backbone: str, image_shape: tuple[int, int, int], latent_dim: int, hidden: int,
                 width: int, depth: int = 1, activation: str = "relu") -> nn.Module:
    check_backbone(backbone, image_shape)
    check_mlp_shape(backbone, depth, activation)
    if backbone == "mlp":
        return mlp_decoder(image_shape, hidden, latent_dim, depth, activation)
    return conv_decoder(image_shape, width, latent_dim)


def init_dcgan_weights(module: nn.Module) -> None:
    """N(0, 0.02) for conv weights, N(1, 0.02) for BatchNorm scales (Radford et al. 2016)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def decoder_directions(decoder: nn.Module) -> torch.Tensor:
    """The weight of the decoder's first linear map (features x code units): column j is the
    direction code unit j writes into the decoder. For a linear decoder (an SAE's dictionary) it
    is the decoder itself; for ours, whose first layer is linear, the direction into its first
    hidden layer."""
    first = next(m for m in decoder.modules() if isinstance(m, nn.Linear))
    return first.weight


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def as_tuple_shape(image_shape) -> tuple[int, int, int]:
    """Hyper-parameters come back from YAML and checkpoints as lists; nets want a tuple."""
    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3:
        raise UserError(f"image_shape must be (channels, height, width), got {image_shape}")
    return shape  # type: ignore[return-value]


__all__ = ["BACKBONES", "as_tuple_shape", "count_parameters", "init_dcgan_weights",
           "make_decoder", "make_encoder"]
