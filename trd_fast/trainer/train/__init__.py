"""The training step: the batch, the teacher targets and the fused-loss forward and backward."""
