"""The same TRL GKDTrainer step with TRL's generalized_jsd_loss and with trd_fast's (patch_trl), side by side.

    .venv/bin/python -m bench.integrations            # -> bench/results/integrations-cpu.json, table on stdout
    .venv/bin/python -m bench.integrations --smoke    # tiny shapes, checks the script (JSON to the temp dir)

Two measurements per variant, on CPU with 2 threads, fp32:
- loss: `generalized_jsd_loss(student[:, :-1], teacher[:, :-1], labels[:, 1:], beta, num_items_in_batch)` and
  its backward on the logits a GKD step produces ([B, T, V], the views GKDTrainer passes), alone;
- step: a whole GKDTrainer optimizer step (student and teacher forward, loss, backward, clipping, AdamW) from
  on_step_begin to on_step_end of a real trainer.train(), lmbda=0 (no generation), batch collation excluded.
Peak memory is bench.harness's CPU probe: VmHWM - VmRSS with VmHWM reset right before each timed round, so
what was live before the round (models, optimizer state, inputs) is not counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

from bench import harness  # noqa: E402
from trd_fast.ops.registry import resolve  # noqa: E402

MIB = 1 << 20
SHAPES = {  # B, T, V, hidden, layers
    "default": dict(batch=4, seq=256, vocab=32768, hidden=256, layers=2),
    "smoke": dict(batch=2, seq=16, vocab=512, hidden=32, layers=1),
}
BETA = 0.5  # GKDConfig's default
VARIANTS = ("trl", "trd_fast")  # TRL's own loss; the same trainer after patch_trl


def tiny_lm(seed: int, shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=2 * shape["hidden"],
                         num_hidden_layers=shape["layers"], num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=shape["seq"], initializer_range=0.2, pad_token_id=0,
                         bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(config)


def tokenizer():
    """A 4-word tokenizer: GKDTrainer wants a processing class; the batches come from `collate` below."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, "w": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def dataset(shape: dict, rows: int):
    """Random token rows of the full length; the first quarter is the prompt (labels -100 there)."""
    from datasets import Dataset
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape["vocab"], (rows, shape["seq"]), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist()})


def collate(rows):
    ids = torch.tensor([r["input_ids"] for r in rows])
    labels = ids.clone()
    labels[:, : ids.shape[1] // 4] = -100
    prompt = ids[:, : ids.shape[1] // 4]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "prompts": prompt,
            "prompt_attention_mask": torch.ones_like(prompt)}


# ------------------------------------------------------------------------------------------------ the loss alone

def loss_function(variant: str):
    from trl.experimental.gkd import GKDTrainer

    from trd_fast.integrations import generalized_jsd_loss
    return GKDTrainer.generalized_jsd_loss if variant == "trl" else generalized_jsd_loss


def bench_loss(variant: str, shape: dict, rounds: int, warmup: int) -> dict:
    b, t, v = shape["batch"], shape["seq"], shape["vocab"]
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(b, t, v, generator=generator) * 2).requires_grad_()
    teacher = torch.randn(b, t, v, generator=generator) * 2
    labels = collate([{"input_ids": [3] * t}] * b)["labels"]
    count = int((labels[:, 1:] != -100).sum())
    fn = loss_function(variant)
    probe = harness.CpuMemoryProbe()
    times, cpu, peaks, value = [], [], [], None

    def step():
        nonlocal value
        student.grad = None
        loss = fn(student[:, :-1], teacher[:, :-1], labels=labels[:, 1:], beta=BETA,
                  num_items_in_batch=torch.tensor(count))
        loss.backward()
        value = float(loss.detach())
    for i in range(warmup + rounds):
        probe.begin()
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        peak = probe.end()
        if i >= warmup:
            times.append(elapsed)
            cpu.append(elapsed_cpu)
            peaks.append(peak)
    return {**harness.summarize(times), "median_cpu_s": statistics.median(cpu), "extra_peak_bytes": _peak(peaks),
            "loss": value, "times_s": times, "cpu_s": cpu}


# ------------------------------------------------------------------------------------------------ the whole step

def bench_step(variant: str, shape: dict, rounds: int, warmup: int) -> dict:
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from trd_fast.integrations import patch_trl

    probe = harness.CpuMemoryProbe()

    class Meter(TrainerCallback):
        def __init__(self):
            self.times, self.cpu, self.peaks, self.start, self.start_cpu = [], [], [], 0.0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            probe.begin()
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)
            self.cpu.append(time.process_time() - self.start_cpu)
            self.peaks.append(probe.end())

    meter = Meter()
    with tempfile.TemporaryDirectory() as out:
        args = GKDConfig(output_dir=out, lmbda=0.0, beta=BETA, max_steps=warmup + rounds,
                         per_device_train_batch_size=shape["batch"], learning_rate=1e-4, report_to=[],
                         logging_strategy="no", save_strategy="no", use_cpu=True, seed=0, max_length=shape["seq"],
                         disable_tqdm=True, dataloader_num_workers=0)
        trainer = GKDTrainer(model=tiny_lm(0, shape), teacher_model=tiny_lm(1, shape), args=args,
                             train_dataset=dataset(shape, shape["batch"] * (warmup + rounds)),
                             data_collator=collate, processing_class=tokenizer(), callbacks=[meter])
        if variant == "trd_fast":
            patch_trl(trainer)
        losses = harness.record_losses(trainer)
        trainer.train()
    times, cpu, peaks = meter.times[warmup:], meter.cpu[warmup:], meter.peaks[warmup:]
    return {**harness.summarize(times), "median_cpu_s": statistics.median(cpu), "extra_peak_bytes": _peak(peaks),
            "first_step_loss": losses[0], "times_s": times, "cpu_s": cpu}


def _peak(peaks: list):
    """The largest extra peak over the timed rounds (None where the probe is unavailable)."""
    known = [p for p in peaks if p is not None]
    return max(known) if known else None


# ------------------------------------------------------------------------------------------------ document

def run(shape_name: str, rounds: int, warmup: int) -> dict:
    import transformers
    import trl
    torch.set_num_threads(2)
    shape = SHAPES[shape_name]
    b, t, v = shape["batch"], shape["seq"], shape["vocab"]
    logits_bytes = b * t * v * 4
    document = {
        "what": "TRL GKDTrainer step and its loss: TRL's generalized_jsd_loss vs trd_fast.integrations.patch_trl",
        "machine": harness.machine("cpu"),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
        "backend": resolve(None, torch.device("cpu")),  # what "auto" / TRD_FAST_BACKEND picks for CPU tensors
        "case": {**shape, "beta": BETA, "dtype": "float32", "positions": b * (t - 1),
                 "prompt_fraction": 0.25, "logits_bytes_each": logits_bytes},
        "method": {"loss": "generalized_jsd_loss(student[:, :-1], teacher[:, :-1], labels[:, 1:], beta, "
                           "num_items_in_batch) + backward, wall clock, on [B, T, V] fp32 logits N(0, 4)",
                   "step": "GKDTrainer.train() with lmbda=0, on_step_begin -> on_step_end (student + teacher "
                           "forward, loss, backward, grad clipping, AdamW, zero_grad); batch collation excluded",
                   "rounds": rounds, "warmup": warmup, "memory": harness.CpuMemoryProbe.method,
                   "cpu_s": "time.process_time() over the same interval: CPU seconds of all threads of the process"},
        "rows": [],
    }
    for variant in VARIANTS:
        document["rows"].append({"variant": variant, "loss": bench_loss(variant, shape, rounds, warmup),
                                 "step": bench_step(variant, shape, rounds, warmup)})
    document["machine"]["loadavg_at_end"] = harness.loadavg()
    trl_row, ours = document["rows"]
    document["speedup"] = {"loss": trl_row["loss"]["median_s"] / ours["loss"]["median_s"],
                           "step": trl_row["step"]["median_s"] / ours["step"]["median_s"]}
    document["agreement"] = {
        "loss_rel_diff": abs(ours["loss"]["loss"] - trl_row["loss"]["loss"]) / abs(trl_row["loss"]["loss"]),
        "first_step_loss_rel_diff": abs(ours["step"]["first_step_loss"] - trl_row["step"]["first_step_loss"])
        / abs(trl_row["step"]["first_step_loss"])}
    return document


def markdown(document: dict) -> str:
    m, c = document["machine"], document["case"]
    head = (f"{m['cpu']}, {m['torch_threads']} threads; torch {m['torch']}, TRL {document['versions']['trl']}, "
            f"transformers {document['versions']['transformers']}; backend {document['backend']}; {m['date']}.\n"
            f"GKD step: B={c['batch']}, T={c['seq']}, V={c['vocab']}, fp32, beta={c['beta']}, Llama "
            f"{c['layers']} layers x {c['hidden']} hidden (student and teacher); one [B, T, V] fp32 logits "
            f"tensor is {c['logits_bytes_each'] / MIB:.0f} MiB. Load average at start / end "
            f"{_load(m.get('loadavg_at_start'))} / {_load(m.get('loadavg_at_end'))} (other work on the machine "
            "stretches wall times; CPU-s = process CPU seconds, all threads). Medians of the timed rounds.\n")
    lines = ["| loss | loss fwd+bwd ms | loss CPU-s | loss extra peak MiB | GKD step ms | step CPU-s | "
             "step extra peak MiB |", "|---|---|---|---|---|---|---|"]
    names = {"trl": "TRL `generalized_jsd_loss`", "trd_fast": "trd_fast (`patch_trl`)"}
    for row in document["rows"]:
        loss, step = row["loss"], row["step"]
        lines.append(f"| {names[row['variant']]} | {loss['median_s'] * 1e3:.0f} | {loss['median_cpu_s']:.2f} | "
                     f"{_mib(loss['extra_peak_bytes'])} | {step['median_s'] * 1e3:.0f} | {step['median_cpu_s']:.2f} | "
                     f"{_mib(step['extra_peak_bytes'])} |")
    s = document["speedup"]
    tail = (f"\n\nSpeedup: loss {s['loss']:.1f}x, whole step {s['step']:.2f}x. First-step loss relative difference "
            f"{document['agreement']['first_step_loss_rel_diff']:.1e}.")
    return head + "\n" + "\n".join(lines) + tail


def _load(values) -> str:
    return "-" if not values else f"{values[0]:.1f}"


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; JSON to the temp dir")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement (default 5, smoke 2)")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.smoke else 5)
    document = run("smoke" if args.smoke else "default", rounds, args.warmup)
    path = (Path(tempfile.gettempdir()) if args.smoke else harness.RESULTS_DIR) / "integrations-cpu.json"
    harness.write_json(path, document)
    print(markdown(document))
    print(f"\nwrote {path} ({rounds} timed rounds after {args.warmup} warmup per measurement)")


if __name__ == "__main__":
    main()
