"""Tessera: private fine-tuning and serving of financial LLMs on Kubernetes."""

__version__ = "0.1.0"
