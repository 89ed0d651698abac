"""Rollout: batched generation with a KV cache, sampling, the per-step trace and token counters."""
