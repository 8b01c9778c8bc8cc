"""paxlike: gin-configured JAX pretraining of PaLM-style decoder-only language models."""

__version__ = "0.1.0"
