"""The run: configuration, model loading, the loop, checkpoints and metrics."""
