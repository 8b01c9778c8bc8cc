"""Checkpointable, per-process seqio input streams."""
