"""A tiny chat setting for the TRL trainers, built in memory (no download): tokenizer, random Llama, dataset."""

import random

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ["<pad>", "<eos>", "<unk>", "user", "assistant", ":"] + [f"w{i}" for i in range(40)]


def tiny_tokenizer():
    """A word-level tokenizer with a chat template, built in memory (no download)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
                               "{% if add_generation_prompt %}assistant : {% endif %}")
    return tokenizer


def tiny_lm(seed):
    """A 2-layer Llama with random weights, spread wide enough that student and teacher disagree."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.5, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config)


def chat_dataset(n=8, seed=0, prompts_only=False):
    """Conversations {"messages": [user, assistant]}, or with prompts_only {"prompt": [user]} (the student
    writes the completions)."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(f"w{rng.randrange(40)}" for _ in range(rng.randint(lo, hi)))
    if prompts_only:
        return Dataset.from_list([{"prompt": [{"role": "user", "content": text(2, 6)}]} for _ in range(n)])
    return Dataset.from_list([{"messages": [{"role": "user", "content": text(2, 6)},
                                            {"role": "assistant", "content": text(2, 8)}]} for _ in range(n)])
