"""Tiny random Hugging Face models (saved, or in memory), a word-level tokenizer and a JSONL task for the trainer
tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["Solve", "answer", "Attempt", "Fix", "Reference", "Steps", "Wait", "Actually", ":", "+", "=", "mod"]
NUMBERS = [str(i) for i in range(40)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB, PAD = 97, 0  # tiny_lm's default vocabulary and its pad id


def make_tokenizer(directory: Path, reverse_words: bool = False):
    """A whitespace word-level tokenizer: <pad>=0, <s>=1 (prepended), </s>=2 (eos), <unk>=3, then words
    (in reverse order with `reverse_words`: a tokenizer that disagrees on shared ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = WORDS[::-1] if reverse_words else WORDS
    vocab = {token: i for i, token in enumerate(SPECIALS + words + NUMBERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def make_model(directory: Path, family: str, vocab: int, *, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A random Llama or Qwen3 causal LM saved with its config; eos = 2, pad = 0."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=hidden // 4, **common))
    with torch.no_grad():  # sharper logits than the default init, so sampling is not uniform noise
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(directory)
    return model


def make_pair(root: Path, *, teacher_vocab_pad: int = 8):
    """A Qwen3 student and a Llama teacher with a larger (padded) vocabulary, one tokenizer."""
    tokenizer = make_tokenizer(root / "student")
    vocab = len(tokenizer)
    make_model(root / "student", "qwen3", vocab, seed=1)
    make_model(root / "teacher", "llama", vocab + teacher_vocab_pad, hidden=48, seed=2)
    tokenizer.save_pretrained(root / "teacher")
    return root / "student", root / "teacher"


def write_jsonl(path: Path, count: int, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(count):
        a, b = torch.randint(0, 20, (2,), generator=generator).tolist()
        lines.append(json.dumps({"prompt": f"Solve {a} + {b} :", "solution": f"{a} + {b} = {a + b}",
                                 "answer": str(a + b)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_lm(family: str, seed: int, vocab: int = VOCAB, eos: int = 2):
    """A random in-memory Llama or Qwen3 (sdpa attention, sharpened head) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=PAD, eos_token_id=eos, tie_word_embeddings=False)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common))
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():  # sharper next-token distributions than the default init
        model.lm_head.weight.mul_(6.0)
    return model.eval()


def fresh(model, context, completion):
    """[len(completion), V] logits predicting each completion token, from one forward without padding."""
    with torch.no_grad():
        logits = model(input_ids=torch.cat([context, completion])[None]).logits[0].float()
    return logits[len(context) - 1:len(context) + len(completion) - 1]


def implied(model, hidden):
    """[n, V] fp32 logits the final hidden states [n, H] give through the model's LM head (a target as logits)."""
    from trd_fast.heads import lm_head

    with torch.no_grad():
        return lm_head(model).logits(hidden).float()
