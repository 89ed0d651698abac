"""One training step of each mode at a real vocabulary (151936): peak resident memory, time per phase and the
memory of the teacher targets, for random Qwen3 models (student hidden 128, teacher hidden 256, 2 layers each)
with the shipped task's tokenizer, every row sampled to the token cap.

    .venv/bin/python -m bench.engine_scale                  # 32 prompts x 512 tokens and the side-by-side size
    .venv/bin/python -m bench.engine_scale --smoke          # 4 prompts x 16 tokens, JSON to the temp dir
    .venv/bin/python -m bench.engine_scale --before-code DIR    # also run the side-by-side size on the code in DIR

Each (size, mode, code) runs in its own process (so its peak RSS is its own): it builds the engine, makes EOS an
id the tokenizer never samples (rows run to max_new_tokens), trains one step through the run loop and reports
ru_maxrss, the RSS before the step, the phase times of metrics.jsonl and the bytes of the storages holding the
step's teacher targets. `--before-code DIR` runs the same process with DIR first on PYTHONPATH: a checkout of the
dense-logits engine (e.g. `git archive <commit> | tar -x -C DIR` plus the built trd_fast/_C*.so copied in), at
the side-by-side size only; at 32 x 512 its [B, M, V] fp32 logits alone would be 10 GB per tensor. Drafting is
off (draft_tokens 0): random models accept no draft, so drafts would only multiply the verified logits rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 151936
MODES = ("opd", "trd", "trd_splice")
FULL, SIDE_BY_SIDE, SMOKE = (32, 512), (8, 128), (4, 16)   # (prompts, max_new_tokens)
PHASES = ("rollout_s", "refine_s", "train_s", "step_s")
GIB = 2**30


def make_models(root: Path) -> dict[str, str]:
    """Random Qwen3 student (hidden 128) and teacher (hidden 256), 2 layers, vocab 151936, the task's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from trd_fast.tasks import checkpoint_dir

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir("student"))
    paths = {}
    for seed, (name, hidden) in enumerate((("student", 128), ("teacher", 256))):
        torch.manual_seed(seed)
        config = Qwen3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                             max_position_embeddings=4096, tie_word_embeddings=False,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        Qwen3ForCausalLM(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def one_step(student: str, teacher: str, mode: str, prompts: int, tokens: int, out: str) -> dict:
    """Run in a child process: one step of `mode`, its measurements."""
    import torch

    from trd_fast.tasks import ChainTask
    from trd_fast.trainer.run import loop
    from trd_fast.trainer.run.config import from_dict
    from trd_fast.trainer.run.engine import build_engine

    torch.set_num_threads(2)
    config = from_dict({"model": {"student": student, "teacher": teacher},
                        "data": {"task": "chain", "train_examples": prompts},
                        "rollout": {"max_new_tokens": tokens},
                        "distill": {"mode": mode, "draft_tokens": 0},
                        "optim": {"steps": 1, "batch_size": prompts},
                        "run": {"output_dir": out, "progress": False, "checkpoint_every": 0, "resume": False,
                                "save_student": False}})
    engine = build_engine(config)
    engine.student.eos_id = engine.teacher.eos_id = VOCAB - 1   # above the tokenizer's ids: never sampled
    targets = {}
    build_batch = loop.build_batch

    def recording(request):
        batch, times = build_batch(request)
        targets["bytes"] = storage_bytes(batch.targets)
        targets["kind"] = type(batch.targets[0]).__name__
        return batch, times

    loop.build_batch = recording
    before, cpu = resident_bytes(), cpu_seconds()
    started = time.perf_counter()
    record = loop.train(config, ChainTask(), engine)[-1]
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_before_step_bytes": before, "process_s": time.perf_counter() - started,
            "process_cpu_s": cpu_seconds() - cpu,
            "teacher_target_bytes": targets["bytes"], "teacher_target_kind": targets["kind"],
            "trained_tokens": record["trained_tokens"], "sparse_targets": record["sparse_targets"],
            **{k: record[k] for k in PHASES}}


def storage_bytes(targets) -> int:
    """Bytes of the distinct storages the targets (tensors, or objects of ids and logprobs) live in."""
    seen = {}
    for t in targets:
        for tensor in (t.ids, t.logprobs) if hasattr(t, "ids") else (t,):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads): less skewed than wall clock by other work."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS), bytes."""
    with open("/proc/self/status", encoding="utf-8") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def run_child(models: dict, mode: str, size: tuple[int, int], code: Path | None) -> dict:
    """One step of `mode` at `size` (prompts, max_new_tokens) in a fresh process (`code`: a checkout whose engine
    runs instead of this one), as a result row."""
    env = {**os.environ, "TRD_FAST_NO_TRITON": "1"}
    if code is not None:
        env["PYTHONPATH"] = f"{code}{os.pathsep}{env.get('PYTHONPATH', '')}"
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, __file__, "--child", json.dumps([models["student"], models["teacher"], mode,
                                                                       *size, out])]
        load = os.getloadavg()
        done = subprocess.run(command, env=env, capture_output=True, text=True, encoding="utf-8")
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {size} ({code or 'this code'}) failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"mode": mode, "prompts": size[0], "max_new_tokens": size[1],
            "code": "dense logits (before)" if code else "hidden states (after)", "loadavg_1m_at_start": load[0],
            **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="4 prompts x 16 tokens, JSON to the temp dir")
    parser.add_argument("--before-code", type=Path, help="a checkout of the dense-logits engine (see above)")
    parser.add_argument("--size", choices=("all", "side-by-side", "full"), default="all",
                        help="the sizes to run; the JSON keeps the rows of the other sizes it already holds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        student, teacher, mode, prompts, tokens, out = json.loads(args.child)
        print(json.dumps(one_step(student, teacher, mode, prompts, tokens, out)))
        return

    from bench import harness

    sizes = [SMOKE] if args.smoke else {"all": [SIDE_BY_SIDE, FULL], "side-by-side": [SIDE_BY_SIDE],
                                        "full": [FULL]}[args.size]
    path = (Path(tempfile.gettempdir()) if args.smoke else harness.RESULTS_DIR) / \
        "engine-scale-cpu.json"
    kept = json.loads(path.read_text(encoding="utf-8"))["rows"] if path.is_file() and not args.smoke else []
    rows = [r for r in kept if (r["prompts"], r["max_new_tokens"]) not in sizes]
    with tempfile.TemporaryDirectory() as root:
        models = make_models(Path(root))
        for size in sizes:
            for mode in MODES:
                if args.before_code is not None and size != FULL:
                    rows.append(run_child(models, mode, size, args.before_code))
                    print(summary(rows[-1]), flush=True)
                rows.append(run_child(models, mode, size, None))
                print(summary(rows[-1]), flush=True)
    document = {"machine": harness.machine("cpu"),
                "setup": {"vocab_size": VOCAB, "student": "Qwen3, hidden 128, 2 layers (random)",
                          "teacher": "Qwen3, hidden 256, 2 layers (random)", "tokenizer": "the chain task's",
                          "dtype": "float32", "threads": 2, "draft_tokens": 0, "rows sampled to the cap": True,
                          "dense path at 32 x 512": "not run: one [32, 512, 151936] fp32 tensor is 9.3 GiB and "
                                                    "it forms several (teacher targets, scoring, student logits "
                                                    "and their gradient), beyond this 24 GiB machine"},
                "rows": rows, "checks": checks(rows)}
    harness.write_json(path, document)
    for name, value in document["checks"].items():
        print(f"{name}: {value}")
    print(f"written to {path}")


def summary(row: dict) -> str:
    """One result row as a line of the printed table."""
    return (f"{row['code']:<22} {row['mode']:<10} {row['prompts']:>2} x {row['max_new_tokens']:<3} "
            f"peak RSS {row['peak_rss_bytes'] / GIB:.2f} GiB (before the step {row['rss_before_step_bytes'] / GIB:.2f})"
            f" targets {row['teacher_target_bytes'] / 2**20:.1f} MiB ({row['teacher_target_kind']}) "
            + " ".join(f"{k} {row[k]:.1f}" for k in PHASES))


def checks(rows: list[dict]) -> dict:
    """The targets: every mode's step within 6 GiB peak RSS at the full size; teacher targets at most 1/20 of the
    dense path's; step time not worse than the dense path where it ran."""
    after = [r for r in rows if r["code"].startswith("hidden")]
    result = {"every step within 6 GiB peak RSS": all(r["peak_rss_bytes"] <= 6 * GIB for r in after)}
    for r in rows:
        if r["code"].startswith("dense"):
            mine = next(a for a in after if (a["mode"], a["prompts"], a["max_new_tokens"]) ==
                        (r["mode"], r["prompts"], r["max_new_tokens"]))
            key = f"{r['mode']} {r['prompts']}x{r['max_new_tokens']}"
            result[f"{key}: targets over dense"] = mine["teacher_target_bytes"] / r["teacher_target_bytes"]
            result[f"{key}: step over dense"] = mine["step_s"] / r["step_s"]
            result[f"{key}: peak RSS over dense"] = mine["peak_rss_bytes"] / r["peak_rss_bytes"]
    return result


if __name__ == "__main__":
    main()
