"""Model configurations of the shipped teacher and student (Llama architecture, trained from scratch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    hidden: int        # residual width
    layers: int        # decoder layers
    heads: int         # attention heads (no grouped-query sharing)
    intermediate: int  # MLP width


SPECS = {
    "teacher": ModelSpec(hidden=128, layers=3, heads=4, intermediate=384),
    "student": ModelSpec(hidden=64, layers=2, heads=4, intermediate=192),
}


def build_config(spec: ModelSpec, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.heads, intermediate_size=spec.intermediate,
        max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
    )
