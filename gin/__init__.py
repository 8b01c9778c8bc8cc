"""Gin configuration files: models/, layouts/, runs/ (installed as the `paxlike.gin_files` package)."""
