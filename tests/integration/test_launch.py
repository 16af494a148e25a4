"""The real launcher: torchrun starts pretrain_openmoe.py on gloo ranks, and tools/loss_compare.py
finds its metrics equal to a single-process run (and flags a run that differs). The 8B launch scripts:
EXTRA_ARGS overrides every kind of flag, the layout they choose, and the sbatch script's srun command,
environment and requeue decision with stand-ins for srun and scontrol (a real Slurm runs it in
test_slurm.py, marked slow)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megamoe.arguments import parse_args
from megamoe.config import ConfigError
from megamoe.parallel.mesh import ParallelMesh
from tests.harness import TINY_ARGS

KNOBS = ("EXTRA_ARGS", "TP", "EP", "PP", "GBS", "TRAIN_ITERS", "CKPT", "PRECISION", "DATA_PATH", "TOKENIZER",
         "GPUS_PER_NODE", "NNODES", "ZERO_STAGE", "SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
         "CONTAINER_IMAGE", "CONTAINER_MOUNTS", "MASTER_ADDR", "MASTER_PORT", "PYTHON")
ENV = {k: v for k, v in os.environ.items() if k not in KNOBS} | {"OMP_NUM_THREADS": "1"}
ROOT = Path(__file__).resolve().parents[2]
SCRIPT, SBATCH = "examples/pretrain_openmoe_8b.sh", "examples/slurm/pretrain_openmoe_8b.sbatch"


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
    cut = tmp_path / "cut.jsonl"  # a run killed mid-record that never reopened the file
    cut.write_text(a.read_text() + '{"iteration": 3, "lm_lo')
    r = _run([sys.executable, "tools/loss_compare.py", str(a), str(cut)])
    assert r.returncode == 0 and "3 iterations compared" in r.stdout and "incomplete last line" in r.stderr


def _dry_run(**env: str) -> list[str]:
    r = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=ENV | {"DRY_RUN": "1"} | env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_8b_script_extra_args_later_flags_win():
    """argparse keeps the last value of every value flag kind the script uses; a repeated switch is
    harmless; --fp32 after the script's --bf16 is refused (mutually exclusive), hence PRECISION."""
    extra = ("--model-preset openmoe-tiny --expert-model-parallel-size 4 --lr 1e-4 --moe-capacity-factor 2.5 "
             "--lr-decay-style linear --save /ckpt/x --data-path C --seq-length 64 "
             "--use-distributed-optimizer --bf16 --moe-router-group-size 64")
    args = _dry_run(EXTRA_ARGS=extra, DATA_PATH="0.5 A 0.5 B", TOKENIZER="tok.model")
    assert args[-len(extra.split()):] == extra.split()
    assert args.count("--save") == 2 and args.count("--data-path") == 2
    cfg = parse_args(args)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.moe.num_experts) == (4, 64, 8)  # preset
    assert cfg.model.seq_length == 64 and cfg.parallel.expert_model_parallel_size == 4  # int
    assert cfg.train.lr == 1e-4 and cfg.moe.capacity_factor == 2.5  # float
    assert cfg.train.lr_decay_style == "linear" and cfg.train.save == "/ckpt/x"  # str
    assert cfg.moe.router_group_size == 64  # the script's 4096-token groups do not fit this tiny batch
    assert cfg.data.data_path == ("C",)  # nargs="+": replaced, not extended
    assert cfg.train.load == "checkpoints/openmoe-8b"  # --load follows CKPT, not --save
    assert cfg.train.use_distributed_optimizer and cfg.train.bf16  # switches given twice
    with pytest.raises(ConfigError, match="not allowed with argument"):
        parse_args(_dry_run(EXTRA_ARGS="--fp32"))
    assert not parse_args(_dry_run(PRECISION="--fp32")).train.bf16


@pytest.mark.parametrize("gpus_per_node,ep,hierarchical", [(8, 8, False), (8, 16, True), (4, 8, True),
                                                           (8, 4, False)])
def test_8b_script_hierarchical_alltoall_only_when_ep_spans_nodes(gpus_per_node, ep, hierarchical):
    args = _dry_run(GPUS_PER_NODE=str(gpus_per_node), EP=str(ep), NNODES="8")
    assert ("--moe-hierarchical-alltoall" in args) == hierarchical
    assert "--sequence-parallel" in args and "--sequence-parallel" not in _dry_run(TP="1")


def test_8b_script_default_layout_is_what_its_comment_says():
    """8 GPUs per node, TP 2 + SP, EP 8, PP 1 on 4 nodes: TP pairs and EP groups inside a node; DP
    (4 per node) and expert-DP (one per node) across nodes; every checkpoint writer on node 0."""
    cfg = parse_args(_dry_run(NNODES="4"))
    world, node = 32, 8
    cfg.validate(world)
    mesh = ParallelMesh.from_config(cfg.parallel, world, 0, local_world_size=node)
    grids = mesh.grids()
    nodes = {name: [{r // node for r in g} for g in grids[name]] for name in ("tp", "ep", "dp", "edp")}
    assert all(len(n) == 1 for n in nodes["tp"] + nodes["ep"])
    assert all(len(g) == 16 and n == {0, 1, 2, 3} for g, n in zip(grids["dp"], nodes["dp"]))
    assert all(len(g) == 4 and n == {0, 1, 2, 3} for g, n in zip(grids["edp"], nodes["edp"]))
    writers = {g[0] for g in grids["dp"]} | {g[0] for g in grids["edp"]}  # checkpoint.is_writer
    assert writers == set(range(8))


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _sbatch(tmp_path: Path, nodes: int = 2, latest_before: int | None = None, **env: str):
    """Run the sbatch script as Slurm would (SLURM_* variables), srun and scontrol replaced by stubs
    that log their arguments; the srun stub records the rank environment and "saves" iteration
    STUB_ITER, exiting STUB_RC. Returns (exit code, output, stub log)."""
    bin_dir, ckpt, log = tmp_path / "bin", tmp_path / "ckpt", tmp_path / "stub.log"
    bin_dir.mkdir(exist_ok=True)
    _stub(bin_dir / "scontrol", 'echo "scontrol $*" >> "$STUB_LOG"\n'
          '[ "$1 $2" = "show hostnames" ] && printf "localhost\\nnode2\\n"\nexit 0\n')
    _stub(bin_dir / "srun", 'echo "srun $*" >> "$STUB_LOG"\n'
          'env | grep -E "^(NCCL_SOCKET_IFNAME|GLOO_SOCKET_IFNAME|MASTER_ADDR|MASTER_PORT)=" >> "$STUB_LOG"\n'
          '[ -n "${STUB_ITER:-}" ] && printf "iter_%07d\\n" "$STUB_ITER" > "$CKPT/latest"\n'
          'exit "${STUB_RC:-0}"\n')
    ckpt.mkdir(exist_ok=True)
    if latest_before is not None:
        (ckpt / "latest").write_text(f"iter_{latest_before:07d}\n")
    full = ENV | {"PATH": f"{bin_dir}:{ENV['PATH']}", "STUB_LOG": str(log), "CKPT": str(ckpt),
                  "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]",
                  "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NTASKS_PER_NODE": "8"} | env
    r = subprocess.run(["bash", str(ROOT / SBATCH)], cwd=tmp_path, env=full, capture_output=True, text=True,
                       timeout=60)
    return r.returncode, r.stdout + r.stderr, log.read_text() if log.exists() else ""


def test_sbatch_srun_command_and_environment(tmp_path):
    rc, out, log = _sbatch(tmp_path, EXTRA_ARGS="--train-iters 10 --lr 1e-4", STUB_ITER="10", EP="16",
                           SOCKET_IFNAME="ib0", NCCL_SOCKET_IFNAME="eth9", PYTHON="/opt/py/bin/python",
                           CONTAINER_IMAGE="/img/megamoe.sqsh", CONTAINER_MOUNTS="/data:/data")
    assert rc == 0, out
    srun = next(line for line in log.splitlines() if line.startswith("srun "))
    assert (f"--container-image=/img/megamoe.sqsh --container-workdir={ROOT} "
            f"--container-mounts={ROOT}:{ROOT},/data:/data /opt/py/bin/python pretrain_openmoe.py ") in srun
    assert srun.endswith(" --train-iters 10 --lr 1e-4")  # EXTRA_ARGS last
    assert "--moe-hierarchical-alltoall" in srun.split()  # EP 16 over 8-task nodes
    assert "NCCL_SOCKET_IFNAME=eth9" in log and "GLOO_SOCKET_IFNAME=ib0" in log
    assert "MASTER_ADDR=localhost" in log and "MASTER_PORT=6000" in log
    assert "checkpoint at iteration 10 of 10" in out and "requeue" not in log  # done: no requeue


@pytest.mark.skipif(shutil.which("ip") is None or shutil.which("getent") is None, reason="needs ip, getent")
def test_sbatch_detects_the_socket_interface(tmp_path):
    rc, out, log = _sbatch(tmp_path, nodes=1, STUB_ITER="1", EXTRA_ARGS="--train-iters 1")
    assert rc == 0, out
    assert "NCCL_SOCKET_IFNAME=lo" in log and "GLOO_SOCKET_IFNAME=lo" in log  # localhost: loopback


@pytest.mark.parametrize("case", ["progress", "no-progress", "failed"])
def test_sbatch_requeues_only_after_a_clean_stop_with_progress(tmp_path, case):
    before, stub = {"progress": (None, {"STUB_ITER": "4"}), "no-progress": (4, {}),
                    "failed": (2, {"STUB_ITER": "4", "STUB_RC": "3"})}[case]
    rc, out, log = _sbatch(tmp_path, latest_before=before, TRAIN_ITERS="10", **stub)
    assert rc == (3 if case == "failed" else 0), out
    assert ("scontrol requeue 42" in log) == (case == "progress"), out
    if case == "progress":
        assert "requeueing job 42 to continue from iteration 4" in out
    if case == "no-progress":
        assert "no progress since iteration 4: not requeueing" in out
