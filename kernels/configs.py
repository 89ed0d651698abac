"""Tile sizes and warps of the kernels: a few candidates autotuned on GPU, one small fixed tile when interpreted.

One program owns one row and streams over its V columns in tiles of BLOCK_V. A single giant tile (the whole
row in registers) spills at V = 128k and is 5-10x slower; the streaming sweeps keep 4-8 values per column live
(two loaded tiles, their exponentials and products), so the candidates hold 8-16 columns per thread,
BLOCK_V / (32 * num_warps), plus one small tile for short rows (teacher top-k / sparse supports). Compiled
for sm_90 (tests/test_triton_compile.py) they use 32-79 registers at fp32 / bf16 / fp16 and never spill; fp64
values take two registers each, and the 8192-column tile (16 per thread at 16 warps: 128 registers at most)
spills, so fp64 rows never get it (fp64_tiles). triton.autotune benchmarks the candidates once per (V, kind,
tensor dtypes) key. num_stages stays 1: the tile loop has no dot, so Triton's
pipeliner leaves its loads alone and deeper stages only cost compile time.

Under TRITON_INTERPRET=1 (CPU tests) there is one configuration, so nothing is benchmarked, and its tile is
small so that short rows (V = 33) already cross several tiles and exercise the online rescaling.
"""

import os
from dataclasses import dataclass

import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # set before triton is imported, as triton reads it


@dataclass(frozen=True)
class Tile:
    block: int  # columns (or positions) per tile: BLOCK_V, BLOCK_L
    num_warps: int  # warps per program (one program per row)
    num_stages: int = 1  # software pipelining depth of the tile loop (see the module docstring)

    def config(self, name: str) -> triton.Config:
        return triton.Config({name: self.block}, num_warps=self.num_warps, num_stages=self.num_stages)


# Streaming sweeps over a row of V columns (divergence forward and backward, token log-probs).
STREAM_TILES_GPU = (
    Tile(256, 2),  # short rows: top-k / sparse supports
    Tile(1024, 4),  # small vocabularies
    Tile(2048, 4),
    Tile(2048, 8),
    Tile(4096, 8),
    Tile(4096, 16),
    Tile(8192, 16),  # large vocabularies (128k-256k) with few rows in flight per SM
)
STREAM_TILE_INTERPRETED = Tile(16, 1)
FP64_MAX_BLOCK_V = 4096  # widest tile of fp64 rows (the 8192 tile spills, see the module docstring)

# The prefix scan: one program per sequence, tiles of positions.
SCAN_TILE_GPU = Tile(1024, 4)
SCAN_TILE_INTERPRETED = Tile(8, 1)


def stream_configs() -> list:
    """Autotuner candidates for the row-streaming kernels (triton.Config with BLOCK_V)."""
    tiles = (STREAM_TILE_INTERPRETED,) if INTERPRETED else STREAM_TILES_GPU
    return [tile.config("BLOCK_V") for tile in tiles]


def fp64_tiles(configs, named_args, **kwargs) -> list:
    """Autotuner pre-filter (early_config_prune) of the row-streaming kernels: fp64 rows (constexpr FP64) keep
    the tiles of at most FP64_MAX_BLOCK_V columns; other rows keep every candidate."""
    if not {**named_args, **kwargs}.get("FP64", False):
        return configs
    return [config for config in configs if config.kwargs["BLOCK_V"] <= FP64_MAX_BLOCK_V]


# The pre-filter as triton.autotune's prune_configs_by argument.
STREAM_PRUNE = {"early_config_prune": fp64_tiles}


def scan_tile() -> Tile:
    return SCAN_TILE_INTERPRETED if INTERPRETED else SCAN_TILE_GPU
