"""The engine in two processes (torch.distributed, gloo on the CPU, FSDP2 students): 2 ranks x 4 rows give the loss
curve and the final weights of 1 process x 8 rows in every mode, from the loop and from the command line; each rank
evaluates its share of the eval set and together they give one process's accuracy; a run stopped while writing a
checkpoint resumes from the previous one onto the uninterrupted curve; runs may follow one another in the same
processes; only rank 0 writes files, after the last collective where it is slow; a non-finite loss on one rank
stops both before the optimizer step; a rank that raises ends the run, and one that stalls fails it at the
collective timeout. The 2-rank runs are forked processes with torchrun's environment; the command-line ones run
under torchrun itself."""

from __future__ import annotations

import builtins
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from test_trainer_engine import models  # noqa: F401  (the fixture: tiny student, teacher, data)
from trd_fast import cli
from trd_fast.tasks.jsonl import JsonlTask
from trd_fast.trainer.run import loop
from trd_fast.trainer.run.config import from_dict
from trd_fast.trainer.run.sharded_checkpoint import CHECKPOINTS

MODES = ("opd", "trd", "trd_splice")
RANKS = 2
REPOSITORY = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the torchrun command, from this interpreter


def raw_config(models, out, **sections) -> dict:
    """Greedy rollouts (so the rows a rank draws do not depend on which rank draws them), 8 prompts per step."""
    raw = {"model": {"student": models["student"], "teacher": models["teacher"]},
           "data": {"train_jsonl": models["data"], "eval_examples": 8},
           "rollout": {"max_new_tokens": 6, "temperature": 0.0},
           "distill": {"splice_threshold": 3.0},
           "optim": {"steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1},
           "run": {"output_dir": str(out), "progress": False, "checkpoint_every": 1, "collective_timeout_s": 60.0}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(scenario: str, raw: dict, report: Path) -> None:
    """Run `scenario` (a function of this file taking rank, raw config and a report path) in RANKS processes with
    the environment torchrun would give them; each writes what it saw to report/rank{r}.json. The processes are
    forked (they start in a second instead of importing everything again) and run one thread each, so no OpenMP
    region of the parent is entered after the fork."""
    report.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(scenario, raw, str(report), free_port()), nprocs=RANKS, join=True,
                       start_method="fork")


def _worker(rank: int, scenario: str, raw: dict, report: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(RANKS),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    seen = globals()[scenario](rank, raw)
    Path(report, f"rank{rank}.json").write_text(json.dumps(seen))


class Writes:
    """Paths this process opens for writing, creates, or renames to, while active."""

    def __init__(self):
        self.paths: list[str] = []
        self._open, self._mkdir, self._rename, self._replace = builtins.open, os.mkdir, os.rename, os.replace

    def __enter__(self):
        def opened(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                self.paths.append(os.fspath(file))
            return self._open(file, mode, *args, **kwargs)

        def made(path, *args, **kwargs):
            self._mkdir(path, *args, **kwargs)
            self.paths.append(os.fspath(path))

        def renamed(original):
            def rename(source, target, *args, **kwargs):
                self.paths.append(os.fspath(target))
                return original(source, target, *args, **kwargs)
            return rename

        builtins.open = io.open = opened
        os.mkdir, os.rename, os.replace = made, renamed(self._rename), renamed(self._replace)
        return self

    def __exit__(self, *exc):
        builtins.open = io.open = self._open
        os.mkdir, os.rename, os.replace = self._mkdir, self._rename, self._replace


def train_recording_writes(rank: int, raw: dict) -> dict:
    """Train, recording the files this rank writes, and per step the all-gathers and forwards of the rollout phase
    (student rollout and teacher refinement, with the models unsharded) beside the FSDP parameter groups it holds."""
    from contextlib import contextmanager

    import torch.distributed as dist

    from trd_fast.trainer.run.sharding import fsdp_modules

    real_gather, real_unsharded, real_build = dist.all_gather_single, loop.unsharded, loop.build_batch
    phases: list[dict] = []
    inside = []

    def counted_gather(*args, **kwargs):
        if inside:
            phases[-1]["gathers"] += 1
        return real_gather(*args, **kwargs)

    @contextmanager
    def counted_unsharded(*models):
        phases.append({"gathers": 0, "groups": sum(len(fsdp_modules(m)) for m in models), "forwards": 0})
        inside.append(True)
        try:
            with real_unsharded(*models):
                yield
        finally:
            inside.clear()

    def counted_build(request):
        try:
            return real_build(request)
        finally:
            phases[-1]["forwards"] = request.student.counters.forwards + request.teacher.counters.forwards

    dist.all_gather_single, loop.unsharded, loop.build_batch = counted_gather, counted_unsharded, counted_build
    config = from_dict(raw)
    with Writes() as writes:
        records = loop.train(config, JsonlTask(config.data))
    return {"records": records, "writes": writes.paths, "phases": phases}


def interrupted_while_checkpointing(rank: int, raw: dict) -> dict:
    """Train; rank 1 dies in the middle of the checkpoint of step 3: its shard written, the checkpoint unfinished."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    real_write = FileSystemWriter.write_data

    def dying_write(self, plan, planner):
        written = real_write(self, plan, planner)
        if rank == 1 and Path(self.path).name == "step-3.tmp":
            written.wait()
            raise KeyboardInterrupt("killed while writing step 3")
        return written

    FileSystemWriter.write_data = dying_write
    config = from_dict(raw)
    try:
        loop.train(config, JsonlTask(config.data))
    except BaseException as error:  # both ranks end: rank 1 killed, rank 0 failing in the collective it waited in
        return {"error": f"{type(error).__name__}: {error}"}
    return {"error": None}


def resumed_then_poisoned(rank: int, raw: dict) -> dict:
    """Resume the interrupted run to its end, and then once more with another learning rate (refused); then, in a
    fresh run, rank 1's loss turns NaN at step 2."""
    config = from_dict(raw)
    records = loop.train(config, JsonlTask(config.data))
    changed = from_dict({**raw, "optim": {**raw["optim"], "lr": 3 * config.optim.lr}})
    try:
        loop.train(changed, JsonlTask(changed.data))
        refused = None
    except ValueError as error:
        refused = str(error)
    real = loop.train_on

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        if rank == 1 and poisoned.calls == 1:
            result.loss = float("nan")
        poisoned.calls += 1
        return result

    poisoned.calls = 0
    loop.train_on = poisoned
    fresh = from_dict({**raw, "run": {**raw["run"], "output_dir": raw["run"]["output_dir"] + "-nan"}})
    try:
        loop.train(fresh, JsonlTask(fresh.data))
        error = None
    except loop.NonFiniteLoss as stopped:
        error = str(stopped)
    return {"records": records, "refused": refused, "nan_error": error}


def stalled_rank(rank: int, raw: dict) -> dict:
    """Rank 1 stalls (without raising) in step 2; rank 0 waits for it in a collective. Both then end: rank 0 by
    the collective timeout (its report written, its error raised), rank 1 when the parent stops the others."""
    real_step = loop._one_step

    def stalling(config, task, engine, tokenize, examples, step, *rest):
        if step == 1 and rank == 1:
            time.sleep(120)
        return real_step(config, task, engine, tokenize, examples, step, *rest)

    loop._one_step = stalling
    config = from_dict(raw)
    started = time.perf_counter()
    try:
        loop.train(config, JsonlTask(config.data))
    except Exception as error:
        report = {"error": f"{type(error).__name__}: {error}", "seconds": time.perf_counter() - started}
        Path(raw["run"]["output_dir"], "stalled.json").write_text(json.dumps(report))
        raise
    return {}


class MixedVerdictTask(JsonlTask):
    """The JSONL task with a verifier that passes a completion whose character codes sum to an even number: an
    untrained model's completions then get a mix of verdicts, so an accuracy made of wrong counts shows."""

    def verify(self, example, completion: str) -> bool:
        return sum(map(ord, completion)) % 2 == 0


def recorded_evaluations(calls: list[dict]):
    """loop.evaluate, recording per call the prompts evaluated, their completions and the verified counts."""
    real = loop.evaluate

    def recording(runner, task, tokenize, examples, **options):
        result = real(runner, task, tokenize, examples, **options)
        calls.append({"prompts": [e.prompt for e in examples], "completions": result.completions,
                      "verified": list(result.verified)})
        return result
    return recording


def train_recording_evaluations(rank: int, raw: dict) -> dict:
    """Train on the mixed-verdict task, recording this rank's evaluations."""
    calls: list[dict] = []
    loop.evaluate = recorded_evaluations(calls)
    config = from_dict(raw)
    return {"records": loop.train(config, MixedVerdictTask(config.data)), "evaluations": calls}


def slow_rank_zero_at_the_end(rank: int, raw: dict) -> dict:
    """Train; rank 0 takes longer than the collective timeout to plot the curves and again to write the student."""
    pause = 1.5 * raw["run"]["collective_timeout_s"]

    def slowly(write):
        def slow(*args, **kwargs):
            time.sleep(pause)
            return write(*args, **kwargs)
        return slow

    loop.plot_curves, loop.save_model_directory = slowly(loop.plot_curves), slowly(loop.save_model_directory)
    config = from_dict(raw)
    records = loop.train(config, JsonlTask(config.data))
    return {"steps": [r["step"] for r in records], "finished": time.time()}


def single_process(raw: dict) -> list[dict]:
    config = from_dict(raw)
    return loop.train(config, JsonlTask(config.data))


def assert_same_run(records: list[dict], reference: list[dict], student: Path, reference_student: Path) -> None:
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for a, b in zip(records, reference):
        assert a["trained_tokens"] == b["trained_tokens"] and a["y_o_len"] == b["y_o_len"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    weights, expected = load_file(student / "model.safetensors"), load_file(reference_student / "model.safetensors")
    assert sorted(weights) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("mode, teacher", [("opd", "replicate"), ("trd", "shard"), ("trd_splice", "replicate")])
def test_two_ranks_of_four_rows_equal_one_process_of_eight(models, tmp_path, mode, teacher):
    settings = dict(distill={"mode": mode}, run={"eval_every": 3})
    reference = single_process(raw_config(models, tmp_path / "one", **settings))
    raw = raw_config(models, tmp_path / "two", model={"teacher_placement": teacher}, **settings)
    spawn("train_recording_writes", raw, tmp_path / "report")
    seen = [json.loads((tmp_path / "report" / f"rank{r}.json").read_text()) for r in range(RANKS)]
    assert seen[1]["records"] == []
    assert_same_run(seen[0]["records"], reference, tmp_path / "two" / "student", tmp_path / "one" / "student")
    assert seen[0]["records"][-1]["eval_accuracy"] == reference[-1]["eval_accuracy"]
    # Generation gathers each sharded model once per rollout phase (3 steps, then the evaluation), not per forward.
    groups = 3 + (3 if teacher == "shard" else 0)  # 2 decoder layers + the root, per sharded model
    for report in seen:
        rollouts = report["phases"][:3]
        assert [p["groups"] for p in rollouts] == [groups] * 3
        assert [p["gathers"] for p in rollouts] == [groups] * 3
        assert all(p["forwards"] >= 4 for p in rollouts)  # gathering per forward would have made more gathers
    # Only rank 0 writes files: rank 1 writes nothing but its own shard of each checkpoint.
    written = [Path(p) for p in seen[0]["writes"]]
    assert tmp_path / "two" / "metrics.jsonl" in written and any(p.name == ".metadata" for p in written)
    others = [p for p in seen[1]["writes"] if not (Path(p).parent.parent.name == CHECKPOINTS
                                                    and Path(p).name.startswith("__1_"))]
    assert others == [], others
    assert any(Path(p).name.startswith("__1_") for p in seen[1]["writes"])


def test_stopped_while_checkpointing_resumes_onto_the_uninterrupted_curve(models, tmp_path):
    settings = dict(distill={"mode": "trd_splice"})
    reference = single_process(raw_config(models, tmp_path / "one", **settings))
    raw = raw_config(models, tmp_path / "two", **settings)
    spawn("interrupted_while_checkpointing", raw, tmp_path / "crash")
    crashed = [json.loads((tmp_path / "crash" / f"rank{r}.json").read_text()) for r in range(RANKS)]
    assert all(c["error"] for c in crashed) and "killed while writing step 3" in crashed[1]["error"]
    checkpoints = tmp_path / "two" / CHECKPOINTS
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-3.tmp"]  # the write never finished
    spawn("resumed_then_poisoned", raw, tmp_path / "resume")
    resumed = [json.loads((tmp_path / "resume" / f"rank{r}.json").read_text()) for r in range(RANKS)]
    assert_same_run(resumed[0]["records"], reference, tmp_path / "two" / "student", tmp_path / "one" / "student")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-3"]
    for report in resumed:  # every rank refuses a changed recipe, naming the key and the checkpoint's record
        assert report["refused"] and report["refused"].startswith("config optim.lr: ")
        assert f"{CHECKPOINTS}/step-3/config.yaml); set it back" in report["refused"]
    # A NaN loss on rank 1 alone stops both ranks at step 2, before its optimizer step and checkpoint.
    for report in resumed:
        assert report["nan_error"] and "non-finite loss (nan) at step 2" in report["nan_error"]
    stopped = Path(str(tmp_path / "two") + "-nan")
    assert sorted(p.name for p in (stopped / CHECKPOINTS).iterdir()) == ["step-1"]
    assert [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize("eval_examples", [8, 7])
def test_each_rank_evaluates_its_share_giving_one_process_s_accuracy(models, tmp_path, monkeypatch, eval_examples):
    settings = dict(data={"eval_examples": eval_examples}, optim={"steps": 1},
                    run={"eval_every": 1, "checkpoint_every": 0, "save_student": False})
    calls: list[dict] = []
    monkeypatch.setattr(loop, "evaluate", recorded_evaluations(calls))
    one = from_dict(raw_config(models, tmp_path / "one", **settings))
    reference = loop.train(one, MixedVerdictTask(one.data))
    assert 0 < reference[0]["eval_accuracy"] < 1  # a mix of verdicts: counts summed wrongly would show
    spawn("train_recording_evaluations", raw_config(models, tmp_path / "two", **settings), tmp_path / "report")
    seen = [json.loads((tmp_path / "report" / f"rank{r}.json").read_text()) for r in range(RANKS)]
    shares = [report["evaluations"] for report in seen]
    assert [len(s) for s in shares] == [1, 1]  # every rank evaluates once, at the step's end
    assert [len(s[0]["prompts"]) for s in shares] == [eval_examples // 2, eval_examples - eval_examples // 2]
    # The shares are contiguous and, in rank order, the whole eval set with one process's greedy completions.
    assert shares[0][0]["prompts"] + shares[1][0]["prompts"] == calls[0]["prompts"]
    assert shares[0][0]["completions"] + shares[1][0]["completions"] == calls[0]["completions"]
    assert seen[0]["records"][0]["eval_accuracy"] == reference[0]["eval_accuracy"]
    assert seen[1]["records"] == []


def test_rank_shares_are_contiguous_in_rank_order_and_differ_by_at_most_one():
    from trd_fast.trainer.run.world import World

    for size in (1, 2, 3, 4):
        for count in range(10):
            items = list(range(count))
            shares = [World(rank=r, size=size, device=torch.device("cpu"), distributed=True).share(items)
                      for r in range(size)]
            assert sum(shares, []) == items
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_rank_zero_s_plotting_and_saving_after_the_last_collective_keep_nobody_waiting(models, tmp_path):
    raw = raw_config(models, tmp_path / "out", optim={"steps": 1},
                     run={"collective_timeout_s": 6.0, "checkpoint_every": 0})
    spawn("slow_rank_zero_at_the_end", raw, tmp_path / "report")
    seen = [json.loads((tmp_path / "report" / f"rank{r}.json").read_text()) for r in range(RANKS)]
    assert seen[0]["steps"] == [1] and seen[1]["steps"] == []
    assert seen[0]["finished"] - seen[1]["finished"] > 2 * 6.0  # rank 1 was done before rank 0's slow writes
    assert (tmp_path / "out" / "curves.png").is_file() and (tmp_path / "out" / "student" / "config.json").is_file()


def run_cli(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY / "tests")}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPOSITORY)


def cli_arguments(models, out) -> list[str]:
    raw = raw_config(models, out, distill={"mode": "trd"}, optim={"steps": 2, "batch_size": 4})
    return [f"--set={section}.{key}={value}" for section, values in raw.items() for key, value in values.items()]


def test_torchrun_command_line_equals_trd_fast_train(models, tmp_path):
    two = run_cli([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "trd_fast.cli", "train",
                   *cli_arguments(models, tmp_path / "two"), "--set", "optim.batch_size=8"], timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    cli.main(["train", *cli_arguments(models, tmp_path / "one"), "--set", "optim.batch_size=8"])  # trd-fast train
    read = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("two", "one")]
    assert [r["step"] for r in read[0]] == [1, 2]
    assert_same_run(read[0], read[1], tmp_path / "two" / "student", tmp_path / "one" / "student")


def recorded_execv(monkeypatch) -> list[list[str]]:
    """os.execv replaced by a recorder that ends the process's work as exec would."""
    launched = []

    def execv(path, argv):
        launched.append(argv)
        raise SystemExit(0)  # exec never returns

    monkeypatch.setattr(os, "execv", execv)
    return launched


def test_trd_fast_train_nproc_execs_torchrun(models, tmp_path, monkeypatch):
    launched = recorded_execv(monkeypatch)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw_config(models, tmp_path / "out")), encoding="utf-8")
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", str(config), "--nproc", "4", "--set", "optim.steps=2"])
    assert launched == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m",
                         "trd_fast.cli", "train", "--config", str(config), "--set", "optim.steps=2"]]


def a_single_process_checkpoint(out: Path) -> None:
    out.mkdir(parents=True)
    torch.save({"model": {}}, out / "checkpoint.pt")


def a_sharded_checkpoint_trained_with(lr: float):
    def make(out: Path) -> None:
        (out / CHECKPOINTS / "step-1").mkdir(parents=True)
        (out / CHECKPOINTS / "step-1" / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": lr}}))
    return make


@pytest.mark.parametrize("nproc, settings, earlier, message", [
    ("3", [], None, "config optim.batch_size: 8 prompts must split evenly over 3 processes"),
    ("2", ["--set", "optim.micro_batches=8"], None,
     "config optim.micro_batches: 8 micro-batches need at least as many"),
    ("2", ["--set", "optim.lr=2"], None, "config optim.lr: must be in (0, 1]"),
    ("2", [], a_single_process_checkpoint,
     "{out}/checkpoint.pt was written by a run in one process: resume it the same way"),
    ("2", [], a_sharded_checkpoint_trained_with(0.5),
     "config optim.lr: 0.001 here but 0.5 in the config that trained the checkpoint "
     "({out}/checkpoints/step-1/config.yaml)")])
def test_trd_fast_train_nproc_refuses_bad_input_before_starting_processes(models, tmp_path, monkeypatch, capsys,
                                                                         nproc, settings, earlier, message):
    launched = recorded_execv(monkeypatch)
    config, out = tmp_path / "c.yaml", tmp_path / "out"
    config.write_text(yaml.safe_dump(raw_config(models, out)), encoding="utf-8")
    if earlier:
        earlier(out)
    message = message.format(out=out)
    with pytest.raises(SystemExit) as ended:
        cli.main(["train", "--config", str(config), "--nproc", nproc, *settings])
    assert ended.value.code == 2 and not launched  # exit 2, torchrun never started
    error = capsys.readouterr().err
    assert error.startswith(f"trd-fast train: error: {message}") and error.count("\n") == 1, error


FAULTY_RANK = """
import sys
from trd_fast import cli
from trd_fast.trainer.run import loop
real = loop._one_step
def faulty(config, task, engine, tokenize, examples, step, *rest):
    if step == 1 and rest[-1].rank == 1:
        raise RuntimeError("injected fault in rank 1's rollout")
    return real(config, task, engine, tokenize, examples, step, *rest)
loop._one_step = faulty
cli.main(sys.argv[1:])
"""


def test_a_rank_that_raises_ends_the_run_naming_rank_and_error(models, tmp_path):
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY_RANK)
    started = time.perf_counter()
    run = run_cli([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(script), "train",
                   *cli_arguments(models, tmp_path / "out"), "--set", "run.collective_timeout_s=30"], timeout=100)
    assert run.returncode != 0
    assert time.perf_counter() - started < 90
    assert "rank 1: RuntimeError: injected fault in rank 1's rollout" in run.stderr


def test_gpu_check_script_parses_with_its_torchrun_step():
    script = REPOSITORY / "bench" / "gpu_check.sh"
    assert "torch.distributed.run --standalone --nproc_per_node=1" in script.read_text()
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def launcher_environment(monkeypatch, world_size: int) -> None:
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                            WORLD_SIZE=str(world_size), LOCAL_RANK="0").items():
        monkeypatch.setenv(name, value)


def test_a_batch_that_does_not_split_over_the_ranks_stops_before_any_work(models, tmp_path, monkeypatch):
    launcher_environment(monkeypatch, world_size=3)
    config = from_dict(raw_config(models, tmp_path))  # 8 prompts over 3 processes
    with pytest.raises(ValueError, match="optim.batch_size: 8 prompts must split evenly over 3 processes"):
        loop.train(config, JsonlTask(config.data))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_lora_under_torchrun_is_refused_by_name(models, tmp_path, monkeypatch):
    import torch.distributed as dist

    launcher_environment(monkeypatch, world_size=1)
    config = from_dict(raw_config(models, tmp_path, model={"lora_rank": 4}))
    with pytest.raises(ValueError, match="model.lora_rank: LoRA runs in a single process only"):
        loop.train(config, JsonlTask(config.data))
    assert not dist.is_initialized()  # the run took its process group down


def test_a_stalled_rank_fails_the_run_at_the_collective_timeout(models, tmp_path):
    raw = raw_config(models, tmp_path / "out", run={"collective_timeout_s": 5.0, "checkpoint_every": 0})
    started = time.perf_counter()
    with pytest.raises(mp.ProcessRaisedException):
        spawn("stalled_rank", raw, tmp_path / "report")
    assert time.perf_counter() - started < 60  # rank 1 sleeps 120 s: nobody waited for it
    report = json.loads((tmp_path / "out" / "stalled.json").read_text())
    assert "timed out" in report["error"].lower(), report["error"]
    assert 5.0 <= report["seconds"] < 40  # step 1, then the 5 s wait in a collective


def worlds_one_after_another(rank: int, raw: dict) -> dict:
    """Three process groups in a row in the same two processes; rank 0 leaves each one a second after rank 1, so rank
    1 rendezvouses for the next while rank 0 still holds the previous one's store."""
    from trd_fast.trainer.run.world import run_world

    sums = []
    for _ in range(3):
        with run_world("cpu", batch_size=2, micro_batches=1, timeout_s=raw["run"]["collective_timeout_s"]) as world:
            sums.append(world.sum([float(rank + 1)])[0])
            if rank == 0:
                time.sleep(1.0)
    return {"sums": sums}


def test_runs_one_after_another_in_the_same_processes_each_meet_afresh(tmp_path):
    spawn("worlds_one_after_another", {"run": {"collective_timeout_s": 10.0}}, tmp_path)
    for r in range(RANKS):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == {"sums": [3.0, 3.0, 3.0]}
