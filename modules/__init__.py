"""The model families as LightningModules, registered by their declarations (modules/family.py)
under the short names users type."""

# noqa: I001 - imported in the order `bench list`, `bench perf` and the tests show the families
from modules.autoencoder import Autoencoder
from modules.sparse_autoencoder import SparseAutoencoder
from modules.vae import VAE
from modules.gan import GAN
from modules.vqvae import VQVAE
from modules.family import FAMILIES, Family, get_family_class, load_families

# The one list of families, by short name: every file of this package and GENBENCH_FAMILIES'.
MODELS = load_families()
get_model_class = get_family_class

__all__ = ["FAMILIES", "GAN", "MODELS", "VAE", "VQVAE", "Autoencoder", "Family", "SparseAutoencoder",
           "get_model_class", "load_families"]
