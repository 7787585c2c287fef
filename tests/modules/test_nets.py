import pytest
import torch

from bench.errors import UserError
from modules.nets import make_decoder, make_encoder


def test_mlp_is_the_classic_784_64_32_shape():
    encoder = make_encoder("mlp", (1, 28, 28), out_dim=32, hidden=64, width=0)
    linears = [m for m in encoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 64), (64, 32)]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_conv_decoder_outputs_the_image_size(shape):
    decoder = make_decoder("conv", shape, latent_dim=5, hidden=0, width=4)
    assert decoder(torch.randn(2, 5)).shape == (2, *shape)


def test_conv_backbone_rejects_other_sizes():
    with pytest.raises(UserError, match="28x28 or 32x32 images, got 30x30; use backbone='mlp'"):
        make_encoder("conv", (1, 30, 30), 8, 16, 4)


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(UserError, match="unknown backbone 'resnet'; choose one of: mlp, conv"):
        make_encoder("resnet", (1, 28, 28), 8, 16, 4)


def _layers(net):
    return [type(m).__name__ for m in net]


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_conv_encoder_is_the_dcgan_discriminator(shape, batch_norm):
    """Two 4x4 stride-2 convs with LeakyReLU(0.2), BatchNorm (and no conv bias before it) unless
    it is a WGAN-GP critic, then a linear head; parameters counted in closed form."""
    c, w, out, side = shape[0], 4, 3, shape[1] // 4
    encoder = make_encoder("conv", shape, out, hidden=0, width=w, batch_norm=batch_norm)
    norm = "BatchNorm2d" if batch_norm else "Identity"
    assert _layers(encoder) == ["Conv2d", "LeakyReLU", "Conv2d", norm, "LeakyReLU", "Flatten",
                                "Linear"]
    assert [m.negative_slope for m in encoder if isinstance(m, torch.nn.LeakyReLU)] == [0.2, 0.2]
    convs = [m for m in encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(m.kernel_size, m.stride, m.padding) for m in convs] == [((4, 4), (2, 2), (1, 1))] * 2
    expected = (c * w * 16 + w) + (w * 2 * w * 16 + (0 if batch_norm else 2 * w)) \
        + (2 * 2 * w if batch_norm else 0) + (2 * w * side * side * out + out)
    assert sum(p.numel() for p in encoder.parameters()) == expected


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_conv_decoder_is_the_dcgan_generator(shape):
    """A bias-free projection to a 2w x s x s map, BatchNorm + ReLU, a bias-free 4x4 stride-2
    transposed conv, BatchNorm + ReLU, and a last transposed conv with a bias."""
    c, w, z, side = shape[0], 4, 5, shape[1] // 4
    decoder = make_decoder("conv", shape, latent_dim=z, hidden=0, width=w)
    assert _layers(decoder) == ["Linear", "Unflatten", "BatchNorm2d", "ReLU", "ConvTranspose2d",
                                "BatchNorm2d", "ReLU", "ConvTranspose2d"]
    expected = z * 2 * w * side * side + 2 * 2 * w + 2 * w * w * 16 + 2 * w + (w * c * 16 + c)
    assert sum(p.numel() for p in decoder.parameters()) == expected


def test_mlp_depth_and_activation_give_burdas_784_200_200_tanh_encoder():
    encoder = make_encoder("mlp", (1, 28, 28), out_dim=100, hidden=200, width=0, depth=2,
                           activation="tanh")
    assert [type(m).__name__ for m in encoder] == ["Flatten", "Linear", "Tanh", "Linear", "Tanh",
                                                   "Linear"]
    linears = [m for m in encoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 200), (200, 200),
                                                                   (200, 100)]


@pytest.mark.parametrize("kwargs, message", [
    ({"activation": "gelu"}, "unknown activation 'gelu'; choose one of: relu, tanh"),
    ({"depth": 0}, "depth=0: give the number of hidden layers"),
    ({"backbone": "conv", "depth": 2}, "depth and activation shape the mlp backbone")])
def test_bad_mlp_shapes_are_named(kwargs, message):
    args = {"backbone": "mlp"} | kwargs
    with pytest.raises(UserError, match=message):
        make_encoder(args.pop("backbone"), (1, 28, 28), 8, 16, 4, **args)
