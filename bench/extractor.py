"""Feature extractors for FID / IS / KID / precision-recall through torch-fidelity.

Standard FID uses torch-fidelity's `inception-v3-compat`, whose weights are downloaded (or read
from a local path). Where they cannot be had, the harness uses a small CNN classifier of the
dataset, registered with torch-fidelity under a name that carries a hash of its weights, so
FIDs are comparable only between rows with the same `features` value.

The classifier is part of the measurement, so it is built the same way everywhere: seeded before
construction, trained on the CPU on the dataset's whole training split whatever device the run
uses, with the caller's random state left untouched. For Fashion-MNIST and MNIST the trained
weights ship in `bench/extractors/` (with their hash and test accuracy), so every machine
computes the same features and committed baselines compare across machines. Other datasets
(CIFAR-10) train once per machine and are cached; `bench extractor train` writes a file that a
suite names with `eval: {extractor_weights: FILE}`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.defaults import EXTRACTOR_EPOCHS, EXTRACTOR_SEED
from bench.errors import UserError

log = logging.getLogger(__name__)

INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
PUBLISHED_INCEPTION_SHA256_PREFIX = "6726825d"  # torch hub names files by their sha256
SHIPPED_DIR = Path(__file__).parent / "extractors"
FILE_FORMAT = "genbench-classifier-1"
# How the shipped classifiers were trained; a cached one for another dataset uses the same.


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


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order: the same weights
    give the same hash under any torch version (a torch.save blob would not)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


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
    weights_path: str | None = None  # inception weights, or the classifier file that was used
    accuracy: float | None = None  # classifier's test accuracy (None for Inception)
    net: ClassifierNet | None = None
    label: str | None = None  # what rows record as `features`, when it is not `name`

    @property
    def features(self) -> str:
        """The row's `features`: which extractor and which weights made the features."""
        return self.label or self.name


def inception_label(weights_path: str | None) -> str | None:
    """Inception features from weights other than the published file's are another
    measurement: their label carries the file's sha256 (the published file's name carries its
    own prefix, 6726825d, and keeps the plain name)."""
    if not weights_path:
        return None
    digest = hashlib.sha256()
    with open(weights_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    sha = digest.hexdigest()
    return None if sha.startswith(PUBLISHED_INCEPTION_SHA256_PREFIX) else f"{INCEPTION}-{sha[:8]}"


def inception_weights_available(weights_path: str | None) -> bool:
    if weights_path:
        return Path(weights_path).is_file()
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    return hub.is_file()


def check_inception_weights(weights_path: str | None) -> None:
    """Refuse an Inception weights file (the named one, or torch hub's) that does not load as
    plain tensors: torch-fidelity unpickles it with weights_only=False, which would run any
    code its pickle carries."""
    path = Path(weights_path) if weights_path else (
        Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE)
    if not path.is_file():
        return  # torch-fidelity downloads the published file, or says it cannot
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle that asks for more than tensors, or not a torch file
        reason = str(err).strip().split("\n")[0][:160]
        if "Unsupported global" in str(err):
            reason = next(line.strip() for line in str(err).splitlines()
                          if "Unsupported global" in line)[:200]
            raise ExtractorError(f"inception weights {path} do not load as plain tensors "
                                 f"({reason}); refused, since loading it could run code: use "
                                 f"the published {INCEPTION_WEIGHTS_FILE}") from err
        raise ExtractorError(f"inception weights {path} is not torch-fidelity's Inception "
                             f"weights ({type(err).__name__}: {reason}); use the published "
                             f"{INCEPTION_WEIGHTS_FILE}") from err


def get_extractor(features: str, dm, epochs: int | None = None, weights: str | None = None,
                  inception_weights: str | None = None) -> Extractor:
    """`features`: "inception" (torch-fidelity's Inception; downloads the weights if needed),
    "classifier" (the CNN: `weights` if given, else the shipped one for the dataset, else one
    trained and cached on this machine; `epochs` asks for a freshly trained one), or "auto"
    (Inception when its weights are on disk, else the classifier: never a download that would
    hang an offline machine)."""
    if features not in ("auto", "inception", "classifier"):
        raise UserError(f"unknown features {features!r}; choose one of: auto, inception, "
                         "classifier")
    if features == "inception" or (features == "auto"
                                   and inception_weights_available(inception_weights)):
        check_inception_weights(inception_weights)
        return Extractor(INCEPTION, weights_path=inception_weights,
                         label=inception_label(inception_weights))
    path = classifier_path(dm, epochs, weights)
    net, saved = load_classifier(path, dm.spec.name, dm.image_shape)
    return register_classifier(net, saved, path)


def shipped_path(dataset: str) -> Path:
    return SHIPPED_DIR / f"{dataset}.pt"


def classifier_path(dm, epochs: int | None = None, weights: str | None = None) -> Path:
    """The classifier file a run uses: `weights`, else the shipped one (unless `epochs` asks for
    another training), else this machine's cached one, trained now if absent."""
    if weights:
        return Path(weights)
    if epochs is None and shipped_path(dm.spec.name).is_file():
        return shipped_path(dm.spec.name)
    epochs = EXTRACTOR_EPOCHS if epochs is None else epochs
    # a classifier trained on a copy of one's own is that copy's (the published files need no tag)
    own = "" if dm.data_check.status == "verified" else f"-{dm.data_check.md5[:12]}"
    path = (cache_root() / "extractors"
            / f"classifier-{dm.spec.name}{own}-e{epochs}-s{EXTRACTOR_SEED}.pt")
    if not path.is_file():
        log.info(f"training the feature classifier for {dm.spec.title} ({epochs} epochs on the "
                 f"CPU, cached in {path.parent})")
        save_classifier(train_classifier(dm, epochs, EXTRACTOR_SEED), path)
    return path


def train_classifier(dm, epochs: int = EXTRACTOR_EPOCHS, seed: int = EXTRACTOR_SEED) -> dict:
    """Build and train the classifier on the dataset's whole training split (whatever subset a
    run trains on), on the CPU, seeded before construction; returns the file's contents with
    the accuracy on the whole test split. The caller's random state is left as it was."""
    from datamodules import ImageDataModule

    full = ImageDataModule(dm.spec.name, data_dir=str(dm.source.directory), val_size=0,
                           own_files=dm.hparams.own_files)
    full.setup()
    channels, size, _ = full.image_shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ClassifierNet(channels, size, full.num_classes)
        accuracy = _fit(net, full, seed, epochs)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return {"format": FILE_FORMAT, "dataset": full.spec.name, "image_shape": list(full.image_shape),
            "num_classes": full.num_classes, "width": net.body[0].out_channels, "epochs": epochs,
            "seed": seed, "train_images": len(full.train_images),
            "test_images": len(full.test_images), "accuracy": accuracy,
            "sha256": weights_hash(state), "torch": str(torch.__version__), "state_dict": state}


def _fit(net: ClassifierNet, dm, seed: int, epochs: int) -> float:
    """Plain Adam on cross-entropy, batches of 256 in a seeded order; returns test accuracy.
    A plain loop, not a Trainer: the extractor must not depend on the run's Trainer settings."""
    from datamodules import TensorBatches

    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    batches = TensorBatches(dm.train_images.cpu(), dm.train_labels.cpu().long(), 256,
                            shuffle=True, drop_last=True, seed=seed)
    for _ in range(epochs):
        for x, y in batches:
            loss = F.cross_entropy(net(x)[1], y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return classifier_accuracy(net, dm)


@torch.inference_mode()
def classifier_accuracy(net: ClassifierNet, dm) -> float:
    """Fraction of dm's test images whose arg-max class is the label."""
    from datamodules import TensorBatches
    from datamodules.image import EVAL_BATCH_SIZE

    net.eval()
    correct = 0
    for x, y in TensorBatches(dm.test_images.cpu(), dm.test_labels.cpu(), EVAL_BATCH_SIZE,
                              shuffle=False, drop_last=False):
        correct += int((net(x)[1].argmax(1) == y).sum())
    return correct / len(dm.test_images)


def save_classifier(saved: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(saved, tmp)
    os.replace(tmp, path)
    return path


def load_classifier(path: Path, dataset: str | None = None,
                    image_shape: tuple[int, int, int] | None = None) -> tuple[ClassifierNet, dict]:
    """Load a classifier file and check it: it must be one `bench extractor train` wrote, for
    `dataset` and `image_shape` when given, with weights matching their recorded hash."""
    path = Path(path)
    how = "write one with `bench extractor train DATASET --out FILE`"
    if not path.is_file():
        raise ExtractorError(f"extractor weights {path}: no such file; {how}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file fails in zip, pickle or torch's checks
        reason = str(err).strip().split("\n")[0][:160]  # torch's own text runs to a page
        raise ExtractorError(f"extractor weights {path} do not load ({type(err).__name__}: "
                             f"{reason}); {how}") from err
    if not isinstance(saved, dict) or saved.get("format") != FILE_FORMAT:
        raise ExtractorError(f"extractor weights {path} are not a genbench classifier file "
                             f"(expected format {FILE_FORMAT!r}); {how}")
    if dataset is not None and saved["dataset"] != dataset:
        raise ExtractorError(f"extractor weights {path} are for {saved['dataset']}, but the run "
                             f"is on {dataset}: name a {dataset} classifier, or none to use the "
                             "shipped or cached one")
    if image_shape is not None and tuple(saved["image_shape"]) != tuple(image_shape):
        raise ExtractorError(f"extractor weights {path} take images of shape "
                             f"{tuple(saved['image_shape'])}, expected {tuple(image_shape)}")
    channels, size, _ = saved["image_shape"]
    net = ClassifierNet(channels, size, saved["num_classes"], saved["width"])
    net.load_state_dict(saved["state_dict"])
    if weights_hash(net.state_dict()) != saved["sha256"]:
        raise ExtractorError(f"extractor weights {path}: the weights do not match their recorded "
                             f"sha256 {saved['sha256'][:12]}...: the file is corrupt; {how}")
    return net.eval(), saved


class ExtractorError(UserError):
    """A feature-extractor file that cannot serve: the message says why and how to get one."""


def extractor_name(saved: dict) -> str:
    return f"genbench-cnn-{saved['dataset']}-{saved['sha256'][:8]}"


def register_classifier(net: ClassifierNet, saved: dict, path: Path) -> Extractor:
    """Register the classifier with torch-fidelity under its hashed name."""
    import torch_fidelity

    name = extractor_name(saved)
    if name not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(name, make_fidelity_extractor_class(net))
    return Extractor(name, weights_path=str(path), accuracy=saved["accuracy"], net=net)
