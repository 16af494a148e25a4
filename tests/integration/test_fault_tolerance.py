"""Preemption and failures with real processes: SIGTERM saves and exits 0 and the relaunch continues
exactly; a rank killed mid-save leaves the previous checkpoint loadable; a rank that dies or hangs
makes the others exit with an error within --distributed-timeout-minutes; the launch scripts' flags
form valid layouts."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from megamoe.arguments import parse_args
from tests.harness import TINY_ARGS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, args: list[str], entry: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
    """Start ``world`` ranks of pretrain_openmoe.py directly (torchrun-style environment); ``entry``
    replaces the script for some ranks (e.g. a fault-injecting wrapper)."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        script = (entry or {}).get(rank, ["pretrain_openmoe.py"])
        procs.append(subprocess.Popen([sys.executable, *script, *TINY_ARGS, *args], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _metrics(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if '"lm_loss"' in line]


def _wait_for_iterations(path, n: int, procs, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(_metrics(path)) < n:
        assert time.time() < deadline, "training did not reach the wanted iteration"
        assert all(p.poll() is None for p in procs), "a rank exited early"
        time.sleep(0.2)


def test_sigterm_saves_exits_zero_and_resume_is_exact(tmp_path):
    ckpt, m1, m2, ref = tmp_path / "ckpt", tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "r.jsonl"
    common = ["--lr-decay-iters", "400", "--save", str(ckpt), "--load", str(ckpt)]
    procs = _launch(2, common + ["--train-iters", "400", "--metrics-file", str(m1)])
    _wait_for_iterations(m1, 3, procs)
    procs[1].send_signal(signal.SIGTERM)  # only one rank is told; both must stop together
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "exiting after iteration" in outs[0][0] and "signal" in outs[0][0]
    stopped = _metrics(m1)[-1]["iteration"]
    assert (ckpt / "latest").read_text().strip() == f"iter_{stopped:07d}"
    # relaunching the same command (with a shorter horizon) continues exactly
    procs = _launch(2, common + ["--train-iters", str(stopped + 3), "--metrics-file", str(m2)])
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    procs = _launch(2, ["--lr-decay-iters", "400", "--train-iters", str(stopped + 3),
                        "--metrics-file", str(ref)])
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    resumed = _metrics(m2)
    assert [r["iteration"] for r in resumed] == [stopped + 1, stopped + 2, stopped + 3]
    assert [r["lm_loss"] for r in resumed] == [r["lm_loss"] for r in _metrics(ref)[stopped:]]


def test_rank_killed_during_save_leaves_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    procs = _launch(2, ["--train-iters", "6", "--save", str(ckpt), "--save-interval", "2",
                        "--distributed-timeout-minutes", "0.5"],
                    entry={1: ["-m", "tests.integration.crash_in_save", "4"]})  # rank 1 dies saving iter 4
    codes = [p.wait(timeout=120) for p in procs]
    assert codes[1] == 9 and codes[0] != 0
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    assert not (ckpt / "iter_0000004").exists()
    info = subprocess.run([sys.executable, "tools/checkpoint_info.py", str(ckpt)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and "iteration      2" in info.stdout
    metrics = tmp_path / "m.jsonl"
    procs = _launch(1, ["--train-iters", "3", "--load", str(ckpt), "--metrics-file", str(metrics)])
    out, _ = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 0 and "resumed from" in out and "at iteration 2" in out
    assert [r["iteration"] for r in _metrics(metrics)] == [3]


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_dead_or_hung_rank_makes_the_others_fail_fast(tmp_path, how):
    m = tmp_path / "m.jsonl"
    procs = _launch(2, ["--train-iters", "100000", "--metrics-file", str(m), "--log-interval", "1000",
                        "--distributed-timeout-minutes", "0.1"])
    try:
        _wait_for_iterations(m, 2, procs)
        procs[1].send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        start = time.time()
        out, _ = procs[0].communicate(timeout=90)
        assert procs[0].returncode == 1
        assert time.time() - start < 30  # timeout 6 s (hang) or an immediate connection error (kill)
        assert "error: rank 0 lost the job" in out
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _script_args(nnodes: int) -> list[str]:
    env = dict(os.environ, DRY_RUN="1", NNODES=str(nnodes))
    out = subprocess.run(["bash", "examples/pretrain_openmoe_8b.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return out.splitlines()


@pytest.mark.parametrize("nnodes", [1, 8])
def test_8b_launch_script_is_a_valid_layout(nnodes):
    cfg = parse_args(_script_args(nnodes))
    cfg.validate(8 * nnodes)
    assert cfg.model.num_layers == 24 and cfg.moe.num_experts == 32
    assert not cfg.parallel.moe_hierarchical_alltoall  # EP 8 fits in an 8-GPU node: nothing to aggregate
    assert cfg.moe.router_group_size == 4096  # OpenMoE's T5X routing groups
    t = cfg.train
    assert t.use_distributed_optimizer and t.overlap_param_gather and t.zero_stage == 1
    sbatch = subprocess.run(["bash", "-n", "examples/slurm/pretrain_openmoe_8b.sbatch"], cwd=ROOT)
    assert sbatch.returncode == 0
