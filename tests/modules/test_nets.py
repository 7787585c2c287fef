import pytest
import torch

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
    with pytest.raises(ValueError, match="28x28 or 32x32 images, got 30x30; use backbone='mlp'"):
        make_encoder("conv", (1, 30, 30), 8, 16, 4)


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ValueError, match="unknown backbone 'resnet'; choose one of: mlp, conv"):
        make_encoder("resnet", (1, 28, 28), 8, 16, 4)
