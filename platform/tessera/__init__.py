"""Tessera: private fine-tuning and serving of financial LLMs on Kubernetes."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # `from tessera import Client` without importing the client (and its backends) on `import tessera`.
    if name == "Client":
        from tessera.client import Client

        return Client
    raise AttributeError(f"module 'tessera' has no attribute {name!r}")
