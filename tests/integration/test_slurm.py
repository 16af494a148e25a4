"""examples/slurm/pretrain_openmoe_8b.sbatch under a real Slurm: a one-node cluster on this host
(munged, slurmctld, slurmd as root in a temporary state folder; the Debian packages are installed if
missing) runs the script unchanged with openmoe-tiny on 2 CPU tasks (GPU directives overridden on the
sbatch command line, the model through EXTRA_ARGS). The job is stopped three times, the ways the
script documents: SIGUSR1 to the tasks (what ``--signal=USR1@600`` sends before the time limit),
SIGUSR1 to the batch shell (``--signal=B:USR1@...``, relayed by the script's trap), and an outside
``scontrol requeue`` (what preemption with PreemptMode=REQUEUE does: SIGTERM, KillWait, requeue).
Each time every task saves and exits 0 and the job is requeued (by the script, or by Slurm) and
resumes; the losses of the whole run equal an uninterrupted run of the same script exactly.
Slow: about 2.5 minutes on 2 cores."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SBATCH = "examples/slurm/pretrain_openmoe_8b.sbatch"
PACKAGES = ["slurmd", "slurmctld", "slurm-client", "munge"]  # Debian 12: Slurm 22.05, munge 0.5
DAEMONS = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel"]
TRAIN_ITERS = 30
# openmoe-tiny on 2 CPU ranks: TP 2 (+SP) x EP 2, the rest of the 8B script's flags as they are.
EXTRA_ARGS = ("--model-preset openmoe-tiny --seq-length 32 --global-batch-size 8 --micro-batch-size 2 "
              "--lr 3e-3 --lr-warmup-iters 2 --log-interval 1 --moe-router-group-size 64")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install_slurm() -> str | None:
    """Install the Debian packages if a daemon is missing; None when ready, else why not."""
    if all(shutil.which(d) for d in DAEMONS):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:  # stale package lists
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    missing = [d for d in DAEMONS if not shutil.which(d)]
    return f"apt-get install {' '.join(PACKAGES)} failed: {r.stderr[-500:]}" if missing else None


class Cluster:
    """A one-node Slurm whose daemons this object started (stopped by ``stop``, by pid)."""

    def __init__(self, state: Path):
        self.state = state
        self.conf = state / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.pidfiles = {name: state / f"{name}.pid" for name in ("munged", "slurmctld", "slurmd")}
        self.jobs: list[str] = []
        self.pids: dict[str, int] = {}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout}{r.stderr}\n"
                                 f"{self.logs()}")
        return r

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.state / name
            if path.exists():
                out.append(f"--- {name} (tail)\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(out)

    def start(self) -> str | None:
        """Start munged, slurmctld and slurmd; None when the node is up, else why not."""
        s = self.state
        s.chmod(0o755)  # munged wants its socket's folder reachable by everyone
        key = s / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        r = subprocess.run(["munged", "--force", f"--socket={s / 'munge.sock'}", f"--key-file={key}",
                            f"--log-file={s / 'munged.log'}", f"--pid-file={self.pidfiles['munged']}",
                            f"--seed-file={s / 'munged.seed'}"], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return f"munged did not start: {r.stderr.strip()}"
        probe = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
        cpus = re.search(r"CPUs=(\d+)", probe)
        node = socket.gethostname().split(".")[0]
        if cpus is None or int(cpus.group(1)) < 2:
            return f"slurmd -C reports fewer than 2 CPUs: {probe.strip()}"
        for sub in ("state", "spool"):
            (s / sub).mkdir()
        self.conf.write_text(f"""\
ClusterName=megamoe-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long (+ a scheduler pass) before it starts again; 120 s default
AuthInfo=socket={s / 'munge.sock'},cred_expire=5
StateSaveLocation={s / 'state'}
SlurmdSpoolDir={s / 'spool'}
SlurmctldPidFile={self.pidfiles['slurmctld']}
SlurmdPidFile={self.pidfiles['slurmd']}
SlurmctldLogFile={s / 'slurmctld.log'}
SlurmdLogFile={s / 'slurmd.log'}
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=3600
SlurmdParameters=config_overrides
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=cpu Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
        for daemon in (["slurmctld", "-i"], ["slurmd"]):
            r = subprocess.run([*daemon, "-f", str(self.conf)], env=self.env, capture_output=True,
                               text=True, timeout=60)
            if r.returncode != 0:
                return f"{daemon[0]} did not start: {r.stderr.strip()}\n{self.logs()}"
        deadline = time.time() + 60
        while time.time() < deadline:
            r = self.run("sinfo", "-h", "-o", "%T", check=False)
            if r.returncode == 0 and r.stdout.strip() == "idle":
                self.pids = {name: int(path.read_text()) for name, path in self.pidfiles.items()}
                return None
            time.sleep(1)
        return f"the node did not come up: sinfo says {r.stdout.strip() or r.stderr.strip()}\n{self.logs()}"

    def submit(self, output: Path, env: dict[str, str]) -> str:
        """sbatch the 8B script as it is; only the GPU node shape is overridden on the command line."""
        exports = ",".join(["ALL", *(f"{k}={v}" for k, v in env.items())])
        r = self.run("sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                     "--gpus-per-node=0", f"--output={output}", f"--export={exports}", SBATCH)
        job = r.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def stop(self) -> None:
        """Cancel this test's jobs, then stop the daemons it started (by their pids)."""
        for job in self.jobs:
            self.run("scancel", job, check=False)
        deadline = time.time() + 60
        while self.jobs and time.time() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(1)
        self.run("scontrol", "shutdown", check=False, timeout=30)  # slurmctld and slurmd
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.get(name)
            deadline = time.time() + (15 if name != "munged" else 0)
            while pid is not None and _alive(pid) and time.time() < deadline:
                time.sleep(0.5)
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    why = _install_slurm()
    if why:
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        why = c.start()
        if why:
            pytest.skip(f"Slurm cannot start in this container: {why}")
        yield c
    finally:
        c.stop()


def _metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"lm_loss"' in line]


def _wait(what: str, cond, cluster: Cluster, output: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            text = output.read_text() if output.exists() else "(no job output)"
            raise AssertionError(f"timed out waiting for {what}\n--- job output\n{text}\n{cluster.logs()}")
        time.sleep(0.5)


def test_sbatch_script_saves_requeues_and_resumes_exactly(cluster, tmp_path):
    start = time.time()
    ckpt, ref = tmp_path / "ckpt", tmp_path / "ref"
    out, ref_out = tmp_path / "job.out", tmp_path / "ref.out"
    env = {"TP": "2", "EP": "2", "TRAIN_ITERS": str(TRAIN_ITERS), "EXTRA_ARGS": EXTRA_ARGS,
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    metrics = ckpt / "metrics.jsonl"

    job = cluster.submit(out, {**env, "CKPT": str(ckpt), "MASTER_PORT": str(_free_port())})
    stops = []
    # 1: SIGUSR1 to the tasks (what --signal=USR1@600 sends); 2: SIGUSR1 to the batch shell
    # (--signal=B:USR1@600, relayed by the trap); 3: scontrol requeue from outside, what preemption
    # with PreemptMode=REQUEUE does: SIGTERM to everything, SIGKILL KillWait (30 s) later, Slurm requeues
    stop_by = [["scancel", "--signal=USR1"], ["scancel", "--signal=USR1", "--batch"], ["scontrol", "requeue"]]
    for restart, how in enumerate(stop_by):
        seen = len(_metrics(metrics))
        _wait(f"segment {restart} to train 2 iterations", lambda n=seen + 2: len(_metrics(metrics)) >= n,
              cluster, out)
        assert cluster.job(job).get("Restarts") == str(restart)
        cluster.run(*how, job)
        _wait(f"requeue {restart + 1}", lambda n=restart + 1: cluster.job(job).get("Restarts") == str(n)
              and out.read_text().count("srun exit code") == n, cluster, out, timeout=120)
        stops.append(_metrics(metrics)[-1]["iteration"])
    _wait("the job to finish", lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED"),
          cluster, out)
    log = out.read_text()
    info = cluster.job(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log

    # each segment: every task saved (one file per rank in the checkpoint) and srun exited 0
    assert stops[0] < stops[1] < stops[2] < TRAIN_ITERS, (stops, log)
    for k, (it, sig) in enumerate(zip(stops, ["SIGUSR1", "SIGUSR1", "SIGTERM"])):
        assert f"exiting after iteration {it}: signal {sig}" in log, log
        assert f"srun exit code 0; checkpoint at iteration {it} of {TRAIN_ITERS}" in log, log
        assert f"job {job} (restart {k + 1})" in log and f"checkpoint {it}\n" in log, log
        files = sorted(p.name for p in (ckpt / f"iter_{it:07d}").iterdir())
        assert files == ["meta.json", "rank_00000.safetensors", "rank_00001.safetensors"], files
    for it in stops[:2]:  # the script requeued the job itself
        assert f"requeueing job {job} to continue from iteration {it}" in log, log
    assert "SIGUSR1: asking the ranks to save" in log  # the --batch signal went through the trap
    assert "SIGTERM: waiting for the ranks to save" in log  # and SIGTERM did not end the script
    assert log.count("srun exit code 0") == 4 and info["Restarts"] == "3", log
    assert f"srun exit code 0; checkpoint at iteration {TRAIN_ITERS} of {TRAIN_ITERS}" in log, log
    assert (ckpt / "latest").read_text().strip() == f"iter_{TRAIN_ITERS:07d}"

    # the same script, uninterrupted: the same losses at every iteration, exactly
    ref_job = cluster.submit(ref_out, {**env, "CKPT": str(ref), "MASTER_PORT": str(_free_port())})
    _wait("the reference job", lambda: cluster.job(ref_job).get("JobState") in ("COMPLETED", "FAILED"),
          cluster, ref_out)
    assert cluster.job(ref_job)["ExitCode"] == "0:0", ref_out.read_text()
    resumed, uninterrupted = _metrics(metrics), _metrics(ref / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == list(range(1, TRAIN_ITERS + 1))
    assert [r["iteration"] for r in uninterrupted] == list(range(1, TRAIN_ITERS + 1))
    for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in uninterrupted], key
    cmp = subprocess.run([sys.executable, "tools/loss_compare.py", str(metrics), str(ref / "metrics.jsonl"),
                          "--rtol", "0", "--keys", "lm_loss", "grad_norm"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert cmp.returncode == 0 and f"{TRAIN_ITERS} iterations compared, 0 values differ" in cmp.stdout
    print(f"real-Slurm test: {time.time() - start:.0f} s (stops after iterations {stops})")
