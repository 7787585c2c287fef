"""A toy family, all of it in this one file: a tiny autoencoder with one metric of its own. The
contract test (tests/test_contracts.py) registers it and runs every command over it, with no
other file touched: what docs/contributing.md's "Adding a model family" asks of a new family."""

import torch
from torchmetrics import MeanMetric

from bench.metrics import SPLIT, Metric
from modules.autoencoder import Autoencoder
from modules.family import Family
from modules.steps import RECONSTRUCTION_FIGURES


def mean_abs_code(codes: torch.Tensor) -> torch.Tensor:
    """mean_j |h_j| per image: the toy's own figure."""
    return codes.abs().mean(dim=-1)


class ToyAutoencoder(Autoencoder):
    """The autoencoder under another name, judged on its reconstruction and its own figure."""

    family = Family(
        name="toy", summary="a tiny autoencoder for the contract test",
        variants="backbone mlp|conv", judged_metrics=RECONSTRUCTION_FIGURES + ("mean_abs_code",),
        reconstructs=True, codes=True, samples=True,
        metrics=(Metric("mean_abs_code", False, "mean $|h|$", SPLIT, "code units",
                        per_run=True),))

    @torch.inference_mode()
    def own_metrics(self, batches) -> dict[str, float]:
        mean = MeanMetric().to(self.device)  # reduced across processes under DDP
        for x, _ in batches:
            mean.update(mean_abs_code(self.encode(x.to(self.device))))
        return {"mean_abs_code": mean.compute().item()}
