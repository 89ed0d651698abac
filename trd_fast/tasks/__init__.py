"""The shipped synthetic reasoning task (chained modular arithmetic), its tokenizer and pretrained models."""

from .generator import ChainConfig, Problem
from .paths import checkpoint_dir
from .task import ChainTask

__all__ = ["ChainConfig", "ChainTask", "Problem", "checkpoint_dir"]
