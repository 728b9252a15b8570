"""Tessera: private fine-tuning and serving of financial LLMs on Kubernetes."""

__version__ = "0.1.0"

GROUP = "tessera.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
