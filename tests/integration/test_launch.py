"""The real launcher: torchrun starts pretrain_openmoe.py on gloo ranks, and tools/loss_compare.py
finds its metrics equal to a single-process run (and flags a run that differs)."""

import json
import os
import subprocess
import sys

from tests.harness import TINY_ARGS

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


def test_torchrun_tp2_sp_matches_single_process(tmp_path):
    single, tp = tmp_path / "single.jsonl", tmp_path / "tp.jsonl"
    args = TINY_ARGS + ["--train-iters", "5"]
    r1 = _run([sys.executable, "pretrain_openmoe.py", *args, "--metrics-file", str(single)])
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "pretrain_openmoe.py", *args, "--tensor-model-parallel-size", "2", "--sequence-parallel",
               "--metrics-file", str(tp)])
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "TP 2 x DP 1" in r2.stdout
    cmp = _run([sys.executable, "tools/loss_compare.py", str(single), str(tp), "--rtol", "1e-5",
                "--keys", "lm_loss", "grad_norm"])
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert "5 iterations compared, 0 values differ" in cmp.stdout


def test_loss_compare_flags_differences(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"iteration": i, "lm_loss": 2.0 + i}) + "\n" for i in range(3)))
    b.write_text("".join(json.dumps({"iteration": i, "lm_loss": 2.0 + i * 1.01}) + "\n" for i in range(3)))
    r = _run([sys.executable, "tools/loss_compare.py", str(a), str(b), "--rtol", "1e-3"])
    assert r.returncode == 1 and "2 values differ" in r.stdout
    assert _run([sys.executable, "tools/loss_compare.py", str(a), str(a)]).returncode == 0
    missing = _run([sys.executable, "tools/loss_compare.py", str(a), str(tmp_path / "nope.jsonl")])
    assert missing.returncode == 2 and "nope.jsonl" in missing.stderr
