"""Feature extractors for FID / IS / KID / precision-recall through torch-fidelity.

Standard FID uses torch-fidelity's `inception-v3-compat`, whose weights are downloaded (or read
from a local path). Where they cannot be had, the harness trains a small CNN classifier on the
dataset's training split, caches it on disk by dataset, seed and training settings, and registers
it with torch-fidelity under a name that carries a hash of its weights. FIDs are comparable only
between rows with the same `features` value.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def cache_root() -> Path:
    """Where extractors and torch-fidelity's real-data statistics are cached."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "genbench"
    return Path(os.environ.get("GENBENCH_CACHE", default))


class ClassifierNet(nn.Module):
    """Two 3x3 conv blocks and two linear layers; `features` is the 128-d penultimate layer (the
    analogue of Inception's pool3 for FID/KID/PRC), `logits` the class scores (for IS)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 16):
        super().__init__()
        self.in_channels = in_channels
        side = image_size // 4
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * side * side, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


def _state_hash(net: nn.Module) -> str:
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in net.state_dict().items()}, buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()[:8]


def make_fidelity_extractor_class(net: ClassifierNet):
    """A torch-fidelity FeatureExtractorBase around a trained classifier. torch-fidelity builds
    extractors from a registered class, so the trained net is bound into a fresh class."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class GenbenchClassifierExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = net

        @staticmethod
        def get_provided_features_list():
            return ("features", "logits_unbiased")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits_unbiased", "fid": "features", "kid": "features",
                    "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

        def forward(self, x):
            # torch-fidelity feeds uint8 N x 3 x H x W; grayscale arrives repeated to 3 channels.
            x = x[:, : self.net.in_channels].float() / 255.0
            features, logits = self.net(x)
            provided = {"features": features, "logits_unbiased": logits}
            return tuple(provided[name] for name in self.features_list)

    return GenbenchClassifierExtractor


@dataclass
class Extractor:
    """What evaluate() passes to torch-fidelity, and what the result row records."""

    name: str  # registered torch-fidelity name, e.g. genbench-cnn-fashion_mnist-1a2b3c4d
    weights_path: str | None = None  # for inception-v3-compat from a local file
    accuracy: float | None = None  # classifier's test accuracy (None for Inception)
    net: ClassifierNet | None = None


def inception_weights_available(weights_path: str | None) -> bool:
    if weights_path:
        return Path(weights_path).is_file()
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    return hub.is_file()


def get_extractor(features: str, dm, seed: int, epochs: int = 2, device: torch.device | None = None,
                  inception_weights: str | None = None, log=print) -> Extractor:
    """`features`: "inception" (torch-fidelity's Inception; downloads the weights if needed),
    "classifier" (the trained CNN), or "auto" (Inception when its weights are on disk, else the
    classifier: never a download that would hang an offline machine)."""
    if features not in ("auto", "inception", "classifier"):
        raise ValueError(f"unknown features {features!r}; choose one of: auto, inception, "
                         "classifier")
    if features == "inception" or (features == "auto"
                                   and inception_weights_available(inception_weights)):
        return Extractor(INCEPTION, weights_path=inception_weights)
    return trained_classifier(dm, seed, epochs, device, log)


def trained_classifier(dm, seed: int, epochs: int, device: torch.device | None = None,
                       log=print) -> Extractor:
    """Train (or load from the cache) the classifier on dm's training split and register it."""
    import torch_fidelity

    device = device or torch.device("cpu")
    channels, size, _ = dm.image_shape
    key = f"{dm.spec.name}-n{len(dm.train_images)}-e{epochs}-s{seed}"
    path = cache_root() / "extractors" / f"classifier-{key}.pt"
    net = ClassifierNet(channels, size, dm.num_classes)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(saved["state_dict"])
        accuracy = saved["accuracy"]
    else:
        log(f"training the feature classifier for {dm.spec.title} ({epochs} epochs, cached in "
            f"{path.parent})")
        accuracy = _train_classifier(net, dm, seed, epochs, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": net.state_dict(), "accuracy": accuracy}, tmp)
        os.replace(tmp, path)
    net = net.to(device).eval()
    name = f"genbench-cnn-{dm.spec.name}-{_state_hash(net)}"
    if name not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(name, make_fidelity_extractor_class(net))
    return Extractor(name, accuracy=accuracy, net=net)


def _train_classifier(net: ClassifierNet, dm, seed: int, epochs: int,
                      device: torch.device) -> float:
    """Plain Adam on cross-entropy; returns accuracy on the test split."""
    from datamodules import TensorBatches

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    batches = TensorBatches(dm.train_images.to(device), dm.train_labels.to(device), 256,
                            shuffle=True, drop_last=True, seed=seed)
    for _ in range(epochs):
        for x, y in batches:
            loss = F.cross_entropy(net(x)[1], y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()
    correct = 0
    with torch.inference_mode():
        for x, y in TensorBatches(dm.test_images.to(device), dm.test_labels.to(device), 1000,
                                  shuffle=False, drop_last=False):
            correct += int((net(x)[1].argmax(1) == y).sum())
    torch.random.set_rng_state(generator_state)  # leave the run's random stream untouched
    return correct / len(dm.test_images)
