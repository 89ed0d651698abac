"""A word-level tokenizer for the chain task: every number 0..MAX_NUMBER is one token, words are split on
whitespace, decoding joins tokens with single spaces (so decode(encode(text)) == text for task texts)."""

from __future__ import annotations

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
MAX_NUMBER = 499  # numbers the vocabulary holds; the task itself uses far fewer
WORDS = ("Solve", "mod", ":", "Steps", "Attempt", "Fix", "Reference", "answer", "+", "-", "*", "=", ";",
         "Wait", "Actually", "so", "check", "wrong")
EPISTEMIC_WORDS = ("Wait", "Actually")


def vocabulary() -> dict[str, int]:
    tokens = list(SPECIALS) + list(WORDS) + [str(i) for i in range(MAX_NUMBER + 1)]
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer():
    """A `PreTrainedTokenizerFast` (WordLevel + whitespace split); no special token is added on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with one space
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, padding_side="left", model_max_length=512,
    )
