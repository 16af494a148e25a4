"""Signals through the launcher, with real processes: examples/pretrain_openmoe_8b.sh execs
megamoe.launch (torchrun with SIGTERM / SIGUSR1 / SIGINT relayed to the workers), so a signal to the
script's pid is a signal to the torchrun process. openmoe-tiny on 2 CPU ranks (TP 2 + SP, EP 2)
through EXTRA_ARGS, the rest of the 8B script's flags as they are. After the signal every worker has
saved and exited, none is left running, the script exits 0, and a relaunch resumes exactly (the
losses equal an uninterrupted run's). Before this, SIGUSR1 killed torchrun (138) and left the workers
training as orphans, and SIGTERM ended in torchrun's traceback and exit code 1."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megamoe.launch import catches, child_pids
from tests.integration.test_launch import ENV, ROOT, SCRIPT

EXTRA_ARGS = ("--model-preset openmoe-tiny --seq-length 32 --global-batch-size 8 --micro-batch-size 2 "
              "--lr 3e-3 --lr-warmup-iters 2 --lr-decay-iters 400 --log-interval 1 "
              "--moe-router-group-size 64")
REF_ITERS = 12  # the uninterrupted run every stopped run is compared with


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(ckpt: Path, train_iters: int, log: Path) -> subprocess.Popen:
    env = ENV | {"CKPT": str(ckpt), "GPUS_PER_NODE": "2", "TP": "2", "EP": "2", "PRECISION": "--fp32",
                 "TRAIN_ITERS": str(train_iters), "MASTER_PORT": str(_free_port()), "EXTRA_ARGS": EXTRA_ARGS,
                 "PYTHON": sys.executable}
    # output to a file: a pipe nobody reads would fill and block the workers
    return subprocess.Popen(["bash", SCRIPT], cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def _finish(ckpt: Path, train_iters: int, log: Path) -> None:
    proc = _start(ckpt, train_iters, log)
    assert proc.wait(timeout=120) == 0, log.read_text()


def _metrics(ckpt: Path) -> list[dict]:
    path = ckpt / "metrics.jsonl"
    return [json.loads(line) for line in path.open()] if path.exists() else []


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(what: str, cond, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"the launcher exited before {what}:\n{log.read_text()}"
        assert time.time() < deadline, f"timed out waiting for {what}:\n{log.read_text()}"
        time.sleep(0.1)


def _stop_and_check(tmp_path: Path, sig: signal.Signals, when: str) -> tuple[Path, int, str]:
    """Start the script, send ``sig`` to its pid (``when``: 'training' after 3 iterations, 'startup'
    as soon as the workers exist, before their handlers do), and check the clean stop."""
    ckpt, log = tmp_path / "ckpt", tmp_path / "run.log"
    proc = _start(ckpt, 400, log)
    _wait("two workers", lambda: len(child_pids(proc.pid)) == 2, proc, log)
    with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
        assert b"megamoe.launch" in f.read()  # the script exec'd: its pid is the torchrun process
    workers = child_pids(proc.pid)
    if when == "training":
        _wait("3 iterations", lambda: sum("lm_loss" in r for r in _metrics(ckpt)) >= 3, proc, log)
    else:
        assert not any(catches(pid, signal.SIGTERM) for pid in workers)  # still importing torch
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 0, log.read_text()
    assert not [pid for pid in workers if _alive(pid)], "a worker outlived the launcher"
    out = log.read_text()
    stopped = _metrics(ckpt)[-1]["iteration"]
    relayed = "SIGTERM" if sig == signal.SIGINT else sig.name
    assert f"exiting after iteration {stopped}: signal" in out and relayed in out, out
    assert f"saved checkpoint at iteration {stopped}" in out, out
    assert (ckpt / "latest").read_text().strip() == f"iter_{stopped:07d}"
    files = sorted(p.name for p in (ckpt / f"iter_{stopped:07d}").iterdir())
    assert files == ["meta.json", "rank_00000.safetensors", "rank_00001.safetensors"], files
    assert "Traceback" not in out and "SignalException" not in out, out
    return ckpt, stopped, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    d = tmp_path_factory.mktemp("ref")
    _finish(d / "ckpt", REF_ITERS, d / "run.log")
    return _metrics(d / "ckpt")


def _assert_resumes_exactly(ckpt: Path, stopped: int, reference: list[dict], log: Path) -> None:
    assert stopped + 2 <= REF_ITERS, f"stopped at {stopped}, later than the reference covers"
    _finish(ckpt, stopped + 2, log)  # the same command: auto-resume from $CKPT
    assert f"resumed from {ckpt} at iteration {stopped}" in log.read_text()
    records = _metrics(ckpt)  # the stopped run's records, then the resumed run's
    assert [r["iteration"] for r in records] == list(range(1, stopped + 3))
    for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
        assert [r[key] for r in records] == [r[key] for r in reference[:stopped + 2]], key


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_to_the_launch_script_saves_exits_zero_and_resumes_exactly(tmp_path, reference, sig):
    ckpt, stopped, out = _stop_and_check(tmp_path, sig, "training")
    assert f"launcher: {sig.name} -> the workers" in out
    _assert_resumes_exactly(ckpt, stopped, reference, tmp_path / "resume.log")


def test_ctrl_c_during_startup_is_held_until_the_workers_can_save(tmp_path):
    """SIGINT (Ctrl-C) goes to the workers as SIGTERM, and only once they catch it: sent while they
    are still importing torch, the default action would kill them without a save."""
    _, _, out = _stop_and_check(tmp_path, signal.SIGINT, "startup")
    assert "launcher: SIGINT as SIGTERM -> the workers" in out  # held, not lost: the run stopped


def test_signal_before_any_worker_exits_at_once(tmp_path):
    """A launcher still in rendezvous (waiting for a second node that never comes) has nothing to
    save or orphan: it stops at once with 128 + the signal, as the default action would."""
    log = tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "-m", "megamoe.launch", "--nnodes", "2", "--node-rank", "0",
                             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
                             str(_free_port()), "pretrain_openmoe.py", "--model-preset", "openmoe-tiny",
                             "--mock-data"], cwd=ROOT, env=ENV, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    try:
        _wait("the relay to be installed", lambda: catches(proc.pid, signal.SIGUSR1), proc, log, timeout=60)
        time.sleep(0.5)  # into the rendezvous
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM, log.read_text()
    finally:
        proc.kill()
    assert "launcher: SIGTERM before any worker started; nothing to save" in log.read_text()


def test_a_failed_worker_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "megamoe.launch", "--standalone", "--nproc-per-node", "2",
                        "pretrain_openmoe.py", "--model-preset", "openmoe-tiny", "--mock-data",
                        "--adam-beta1", "1.5"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert "error: --adam-beta1 must be in [0, 1), got 1.5" in r.stdout  # each worker's own line
    assert "error: workers failed: rank 0 (pid " in r.stderr and "Traceback" not in r.stderr, r.stderr
