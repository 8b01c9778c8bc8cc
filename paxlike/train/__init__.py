"""The train program, the step loop, optimizers, checkpoints, metrics and faults."""
