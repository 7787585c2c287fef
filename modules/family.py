"""What a model family is and can do, declared once on its class (`family = Family(...)`), and
the one list of families that the CLI, `bench perf`, preflight, the evaluator, the regression
gate and the tests read.

A family's class declares its `Family` and provides the methods of what it declares:

  reconstructs  encode(x) -> codes, decode(codes) -> images in [0, 1], reconstruct(x):
                recon_mse, psnr, ssim, fvu, shrinkage
  codes         its codes (encode's output) are counted, and decoder_directions() gives the
                direction each code unit writes into the decoder (features x units): l0,
                dead_fraction, dense_fraction, hoyer, max_decoder_cosine
  likelihood    elbo_terms(x, eps) -> (log p(x|z), KL) per image, iw_nll(x, k, chunk, noise)
                and `latent_dim` (eps's width): elbo, rate, distortion, iw_nll
  samples       sample(n) -> n images in [0, 1] (global generator): FID, IS, KID, PR, DC
  metrics       figures of its own, declared as `bench.metrics.Metric`s and computed by its
                `own_metrics(test_batches)`

Defining a class with a `family` registers it under `family.name` (a suite's `model:`). The
families in this package's files are found by `load_families()`; a family kept elsewhere is
named by its module in the GENBENCH_FAMILIES environment variable (comma-separated), e.g.
GENBENCH_FAMILIES=mylab.families.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from bench.errors import UserError
from bench.metrics import CAPABILITY_FIGURES, METRICS, Metric, declare, withdraw

if TYPE_CHECKING:
    from modules.steps import BenchModule

# The families by short name, in the order they were defined.
FAMILIES: dict[str, type[BenchModule]] = {}


@dataclass(frozen=True)
class Family:
    """One model family's declaration (see the module's docstring for what each part needs)."""

    name: str  # the short name a suite's `model:` and `bench perf --families` take
    summary: str  # its line in `bench list`
    variants: str  # the settings that make its variants, for `bench list`
    judged_metrics: tuple[str, ...]  # the figures a regression check judges (bench.compare)
    reconstructs: bool = False
    codes: bool = False
    likelihood: bool = False
    samples: bool = False
    metrics: tuple[Metric, ...] = ()  # figures of its own (`own_metrics`)
    # `bench perf`'s constructor arguments beside backbone and image_shape
    perf_params: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    def figures(self, generation: bool = True) -> list[str]:
        """The metrics its evaluation writes (the sample figures only with `generation`)."""
        names = [name for capability, figures in CAPABILITY_FIGURES.items()
                 if getattr(self, capability) and (generation or capability != "samples")
                 for name in figures]
        return names + [m.name for m in self.metrics]


def register(cls: type[BenchModule]) -> None:
    """Add a family's class to FAMILIES and its own metrics to bench.metrics (a class defined
    again under the same name, as a reload does, replaces the earlier one)."""
    family = cls.family
    earlier = FAMILIES.get(family.name)
    if earlier is not None and earlier.__qualname__ != cls.__qualname__:
        raise UserError(f"two families are named {family.name!r}: {earlier.__module__}."
                        f"{earlier.__qualname__} and {cls.__module__}.{cls.__qualname__}; "
                        "rename one (family = Family(name=...))")
    undeclared = set(family.judged_metrics) - {m.name for m in family.metrics} - set(METRICS)
    if undeclared:
        raise UserError(f"{cls.__name__} judges undeclared figure(s) {sorted(undeclared)}: "
                        "declare them in bench/metrics.py or in its Family(metrics=...)")
    for metric in family.metrics:
        declare(metric)
    FAMILIES[family.name] = cls


def unregister(name: str) -> None:
    """Remove a family and its own metrics (for tests that define one for a while)."""
    cls = FAMILIES.pop(name)
    for metric in cls.family.metrics:
        withdraw(metric.name)


def load_families() -> dict[str, type[BenchModule]]:
    """Import every module of this package and those named in GENBENCH_FAMILIES, which
    registers the families they define; returns FAMILIES."""
    package = importlib.import_module("modules")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"modules.{info.name}")
    for name in filter(None, (n.strip() for n in os.environ.get("GENBENCH_FAMILIES", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise UserError(f"GENBENCH_FAMILIES names {name!r}, which does not import ({err}); "
                            "give importable module names, comma-separated") from err
    return FAMILIES


def get_family_class(name: str) -> type[BenchModule]:
    """The class for a short name (ae, sae, vae, gan, ...) or a class name (Autoencoder, ...)."""
    families = load_families()
    key = name.strip().lower()
    if key in families:
        return families[key]
    by_class_name = {cls.__name__.lower(): cls for cls in families.values()}
    if key in by_class_name:
        return by_class_name[key]
    choices = ", ".join(f"{short} ({cls.__name__})" for short, cls in families.items())
    raise UserError(f"unknown model {name!r}; choose one of: {choices}")
