"""The TRD engine: student rollouts, teacher refinement (rewrite or splice), the fused-loss training step."""
