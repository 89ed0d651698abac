"""The shipped synthetic reasoning task (chained modular arithmetic), its tokenizer and pretrained models."""

from trd_fast.tasks.chain import ChainTask
from trd_fast.tasks.generator import ChainConfig, Problem
from trd_fast.tasks.paths import checkpoint_dir

__all__ = ["ChainConfig", "ChainTask", "Problem", "checkpoint_dir"]
