"""paxlike: gin-configured JAX pretraining of PaLM-style decoder-only language models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import paxlike` stays light (no jax until a model is loaded).
    if name == "load_model":
        from paxlike.inference.load import load_model

        return load_model
    raise AttributeError(f"module 'paxlike' has no attribute {name!r}")
