"""Hugging Face checkpoint formats and `paxlike convert`."""
