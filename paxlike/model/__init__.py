"""The Flax decoder-only Transformer: its configuration, layers, loss, parameter and FLOP counts."""
