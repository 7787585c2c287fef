"""The four model families as LightningModules, with the short names users type."""

from modules.autoencoder import Autoencoder
from modules.gan import GAN
from modules.sparse_autoencoder import SparseAutoencoder
from modules.vae import VAE

MODELS = {"ae": Autoencoder, "sae": SparseAutoencoder, "vae": VAE, "gan": GAN}


def get_model_class(name: str):
    """The class for a short name (ae, sae, vae, gan) or a class name (Autoencoder, VAE, ...)."""
    key = name.strip().lower()
    by_class_name = {cls.__name__.lower(): cls for cls in MODELS.values()}
    if key in MODELS:
        return MODELS[key]
    if key in by_class_name:
        return by_class_name[key]
    choices = ", ".join(f"{short} ({cls.__name__})" for short, cls in MODELS.items())
    raise ValueError(f"unknown model {name!r}; choose one of: {choices}")


__all__ = ["GAN", "MODELS", "VAE", "Autoencoder", "SparseAutoencoder", "get_model_class"]
