"""Using trained models: loading a model directory (decoding comes here)."""
