"""Loading student and teacher directories, tokenizer agreement, and the student's packed training forward
(hidden states)."""

from __future__ import annotations

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from trd_fast.trainer.run.loading import (attention_implementation, check_tokenizers_agree, load_causal_lm,
                                          load_tokenizer)
from trd_fast.trainer.train.forward import _packed, _padded, packed_hidden

VOCAB = 61
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm(family: str, seed: int = 0):
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          tie_word_embeddings=False)
    model = model_class(config)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def tokenizer(tokens: list[str], *, eos="</s>", pad: str | None = "<pad>"):
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, unk_token="<unk>", pad_token=pad)


WORDS = ["<pad>", "<unk>", "</s>", "a", "b", "c", "d"]


def per_row(model, rows, keep):
    return torch.cat([model.get_decoder()(input_ids=r[None]).last_hidden_state[0, k] for r, k in zip(rows, keep)])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_and_padded_forwards_equal_per_row_forwards(family):
    model = tiny_lm(family)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, VOCAB, (n,), generator=generator) for n in (5, 12, 1, 8)]
    keep = [torch.tensor([1, 3, 4]), torch.arange(4, 11), torch.tensor([0]), torch.tensor([], dtype=torch.int64)]
    with torch.no_grad():
        expected = per_row(model, rows, keep)                                      # [11, H]
    for forward in (_packed, _padded, packed_hidden):
        hidden = forward(model, rows, keep)
        assert hidden.shape == (11, 32) and hidden.requires_grad
        torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=0)
    packed_hidden(model, rows, keep).sum().backward()
    assert model.model.norm.weight.grad is not None
    assert model.lm_head.weight.grad is None  # the head ran on no position


def test_packed_hidden_rejects_bad_keep():
    model = tiny_lm("llama")
    rows = [torch.arange(4), torch.arange(3)]
    for keep, match in (([torch.tensor([0, 4]), torch.tensor([1])], r"keep\[0\]"),
                        ([torch.tensor([0]), torch.tensor([2, 1])], r"keep\[1\]"),
                        ([torch.tensor([0])], "one length")):
        with pytest.raises(ValueError, match=match):
            packed_hidden(model, rows, keep)
    with pytest.raises(ValueError, match=r"rows\[1\]"):
        packed_hidden(model, [torch.arange(4), torch.arange(0)], [torch.tensor([0]), torch.tensor([0])])


def test_attention_implementation():
    assert attention_implementation(torch.device("cpu")) == "sdpa"
    try:
        import flash_attn  # noqa: F401
        flash = True
    except ImportError:
        flash = False
    assert attention_implementation("cuda") == ("flash_attention_2" if flash else "sdpa")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_load_causal_lm(tmp_path, family):
    model = tiny_lm(family, seed=3)
    model.save_pretrained(tmp_path)
    loaded = load_causal_lm(tmp_path, role="student", dtype=torch.float32)
    assert not loaded.training and loaded.config._attn_implementation == "sdpa"
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_errors_name_role_and_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"student model path {missing}"):
        load_causal_lm(missing, role="student")
    with pytest.raises(FileNotFoundError, match=f"teacher tokenizer path {missing}"):
        load_tokenizer(missing, role="teacher")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"teacher model path {empty} has no config.json"):
        load_causal_lm(empty, role="teacher")
    with pytest.raises(ValueError, match=f"student tokenizer path {empty}"):
        load_tokenizer(empty, role="student")


def test_load_tokenizer_falls_back_to_eos_for_padding(tmp_path):
    tokenizer(WORDS, pad=None).save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path, role="student")
    assert loaded.pad_token_id == loaded.eos_token_id == 2


def test_tokenizers_agree_on_shared_ids(tmp_path):
    student = tokenizer(WORDS)
    check_tokenizers_agree(student, tokenizer(WORDS + ["e", "f"]), "s", "t")  # a longer vocabulary is fine
    with pytest.raises(ValueError, match=r"student /models/s and teacher /models/t .* id 4 is 'b' vs 'x'"):
        check_tokenizers_agree(student, tokenizer(WORDS[:4] + ["x"] + WORDS[5:]), "/models/s", "/models/t")
    with pytest.raises(ValueError, match=r"student /models/s and teacher /models/t .* eos id 2 vs 3"):
        check_tokenizers_agree(student, tokenizer(WORDS, eos="a"), "/models/s", "/models/t")
