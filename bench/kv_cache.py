"""Greedy decoding of long completions with the engine's KV cache (rollout/kv_cache.py: layers that grow in place)
against HF's DynamicCache (every layer concatenated whole at each forward), side by side in one run.

The same random Llama decodes, from the same prompts, the same number of tokens one forward each, with only the cache
differing: a bare loop of the model's forwards, each passed an attention mask and position ids as Runner.decode's
are (so attention takes the masked path), without sampling and counters; so the ratio is the cache's. The two caches
take turns, each round in the other order; medians and minima are kept.

    .venv/bin/python -m bench.kv_cache            # -> bench/results/kv-cache-cpu.json
    .venv/bin/python -m bench.kv_cache --smoke    # short completions, JSON to the temp dir
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from bench import harness
from trd_fast.drivers import positive_int
from trd_fast.trainer.rollout.kv_cache import CACHE_KEYWORD, growing_cache

MODEL = dict(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=8192)
CACHES = ("growing (trd_fast)", "DynamicCache (HF)")


def decode(model, prompts: torch.Tensor, tokens: int, cache) -> torch.Tensor:
    """Greedy decoding of `tokens` tokens after prompts [B, P] with `cache`: one prefill, then a forward per token.
    Returns the tokens [B, tokens]."""
    batch, length = prompts.shape
    mask = torch.ones(batch, length + tokens, dtype=torch.int64)                              # [B, P + tokens]
    out = []
    with torch.no_grad():
        logits = model(input_ids=prompts, attention_mask=mask[:, :length], **{CACHE_KEYWORD: cache}, use_cache=True,
                       logits_to_keep=1).logits[:, -1]                                        # [B, V]
        for step in range(tokens):
            out.append(logits.argmax(-1, keepdim=True))                                     # [B, 1]
            position = torch.full((batch, 1), length + step)
            logits = model(input_ids=out[-1], attention_mask=mask[:, :length + step + 1], position_ids=position,
                           **{CACHE_KEYWORD: cache}, use_cache=True).logits[:, -1]
    return torch.cat(out, dim=1)


def measure(lengths: list[int], batch_size: int, prompt: int, repeats: int) -> list[dict]:
    """Per completion length, the decode time in seconds with each cache (medians and minima over `repeats` rounds
    after an untimed warm-up) and the median per-round ratio of the DynamicCache's time to the growing cache's.
    RuntimeError when the two caches decode different tokens."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, attn_implementation="sdpa")).eval()
    prompts = torch.randint(0, MODEL["vocab_size"], (batch_size, prompt))
    make = {CACHES[0]: lambda: growing_cache(model.config, "model"),
            CACHES[1]: lambda: DynamicCache(config=model.config)}
    for name in CACHES:                                           # warm-up, untimed
        decode(model, prompts, 4, make[name]())
    rows = []
    for length in lengths:
        times = {name: [] for name in CACHES}
        outputs = {}
        clock = harness.clock("cpu")
        for round_ in range(repeats):
            for name in CACHES[::-1] if round_ % 2 else CACHES:
                times[name].append(clock(lambda: outputs.__setitem__(name, decode(model, prompts, length,
                                                                                  make[name]()))))
        if not torch.equal(*outputs.values()):
            raise RuntimeError(f"the two caches decoded different tokens at length {length}")
        row = {"completion_tokens": length, "batch_size": batch_size, "prompt_tokens": prompt}
        for name in CACHES:
            row[f"{name} median_s"] = statistics.median(times[name])
            row[f"{name} min_s"] = min(times[name])
        row["dynamic_over_growing_median"] = statistics.median(
            d / g for d, g in zip(times[CACHES[1]], times[CACHES[0]]))
        rows.append(row)
        print(f"{length} tokens: growing {row[f'{CACHES[0]} median_s']:.3f} s, DynamicCache "
              f"{row[f'{CACHES[1]} median_s']:.3f} s (medians), DynamicCache / growing per round "
              f"{row['dynamic_over_growing_median']:.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="completions of 16 and 64 tokens, 1 repeat, JSON to "
                        "the temp dir (else it overwrites bench/results/kv-cache-cpu.json)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths, repeats = ([16, 64], 1) if args.smoke else ([256, 1024, 4096], args.repeats)
    rows = measure(lengths, batch_size=8, prompt=256, repeats=repeats)
    document = {"machine": harness.machine("cpu"), "setup": {"model": MODEL, "dtype": "float32", "repeats": repeats,
                                                             "threads": args.threads}, "rows": rows}
    path = (Path(tempfile.gettempdir()) if args.smoke else harness.RESULTS_DIR) / "kv-cache-cpu.json"
    harness.write_json(path, document)
    if args.smoke:
        print("smoke run: too short to tell the caches apart")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
