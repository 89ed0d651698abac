"""Dependency ranges: pyproject.toml declares what trd_fast/dependencies.py checks, each part refuses a version
outside its range when it is imported, and generation refuses a model that leaves its KV cache unfilled."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trd_fast.dependencies import SUPPORTED, check_version

ROOT = Path(__file__).resolve().parent.parent


def load_floors():
    pytest.importorskip("tomllib")
    spec = importlib.util.spec_from_file_location("ci_floors", ROOT / ".ci" / "floors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pyproject_declares_the_checked_ranges():
    floors = load_floors()
    declared = floors.floors(ROOT / "pyproject.toml")
    assert {name: declared.get(name) for name in SUPPORTED} == {name: low for name, (low, _) in SUPPORTED.items()}
    assert all(high is None for _, high in SUPPORTED.values())  # pyproject declares no upper bound either
    pins = floors.constraints("2.13.0")
    assert pins[0] == "torch==2.13.0" and "transformers==" + SUPPORTED["transformers"][0] in pins
    assert not any(pin.startswith("triton") for pin in pins)


def test_check_version(monkeypatch):
    check_version("transformers", "5.0.0", "here")
    check_version("torch", "2.13.0+cpu", "here")
    check_version("torch", "2.11.0a0+git1234", "here")       # pre-release and local parts are ignored
    check_version("triton", "unknown", "here")               # nothing to compare
    with pytest.raises(ImportError,
                       match=r"^here needs transformers >= 5\.0\.0; the installed transformers is 4\.57\.6$"):
        check_version("transformers", "4.57.6", "here")
    with pytest.raises(ImportError, match=r"torch >= 2\.11"):
        check_version("torch", "2.10.1", "here")
    monkeypatch.setitem(SUPPORTED, "peft", ("0.18.0", "1.0"))
    check_version("peft", "0.99.9", "here")
    with pytest.raises(ImportError, match=r"peft >= 0\.18\.0, < 1\.0; the installed peft is 1\.0\.0"):
        check_version("peft", "1.0.0", "here")


@pytest.mark.parametrize("module", ["trd_fast.trainer", "trd_fast.integrations.hf"])
def test_importing_a_transformers_part_checks_its_version(module, monkeypatch):
    imported = importlib.import_module(module)
    # the module object transformers is now (importing its Trainer replaces the lazy module in sys.modules)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.56.2")
    with pytest.raises(ImportError, match=rf"^{module} needs transformers >= 5\.0\.0; the installed transformers "
                                          r"is 4\.56\.2$"):
        importlib.reload(imported)
    monkeypatch.undo()
    importlib.reload(imported)


def test_lora_checks_the_peft_version(monkeypatch):
    peft = pytest.importorskip("peft")
    from trd_fast.trainer.run.engine import _with_lora

    monkeypatch.setattr(peft, "__version__", "0.17.1")
    with pytest.raises(ImportError, match=r"^model\.lora_rank > 0 needs peft >= 0\.18\.0"):
        _with_lora(torch.nn.Linear(2, 2), 4, 8.0, ("q_proj",))


def test_importing_trd_fast_checks_torch_and_triton():
    """In a fresh interpreter (with TRITON_INTERPRET=1 trd_fast imports its Triton backend)."""
    code = ("import sys, torch, triton\n"
            "def refused(package, version):\n"
            "    real, package.__version__ = package.__version__, version\n"
            "    try:\n"
            "        import trd_fast\n"
            "    except ImportError as err:\n"
            "        print(err)\n"
            "    else:\n"
            "        print('imported')\n"
            "    package.__version__ = real\n"
            "    for name in [m for m in sys.modules if m.startswith('trd_fast')]:\n"
            "        del sys.modules[name]\n"
            "refused(torch, '2.10.0')\n"
            "refused(triton, '3.5.1')\n")
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "trd_fast needs torch >= 2.11; the installed torch is 2.10.0",
        "trd_fast's Triton backend needs triton >= 3.6; the installed triton is 3.5.1"]


class CacheIgnoringLM(torch.nn.Module):
    """A causal LM whose forward swallows any cache keyword in **kwargs and leaves the cache it was passed empty,
    as transformers 5.17's models do with `cache=`."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    @property
    def device(self):
        return self.inner.device

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def get_decoder(self):
        return self.inner.get_decoder()

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, logits_to_keep=logits_to_keep)


def test_generation_refuses_a_model_that_leaves_the_kv_cache_empty():
    from transformers import LlamaConfig, LlamaForCausalLM

    from trd_fast.trainer.rollout.generation import Runner, SamplingConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = CacheIgnoringLM(LlamaForCausalLM(config).eval())
    runner = Runner(model, pad_id=0, eos_id=1, name="student")
    contexts = [torch.tensor([3, 4, 5]), torch.tensor([6, 7])]
    with pytest.raises(RuntimeError, match=r"^student: the model did not fill the KV cache passed as \w+= "
                                           r"\(0 positions cached, 3 expected\)"):
        runner.generate(contexts, SamplingConfig(max_new_tokens=4, temperature=0.0),
                        generator=torch.Generator().manual_seed(0), capture=False)
