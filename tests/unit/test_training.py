"""Single-process training: the loss falls, resume reproduces the uninterrupted run exactly,
the metrics file carries the promised fields, and the LR schedules have Megatron's shape."""

import json
import math

import pytest
import torch

from megamoe.arguments import parse_args
from megamoe.config import TrainConfig
from megamoe.training.checkpoint import CheckpointError
from megamoe.training.lr import learning_rate
from tests.harness import TINY_ARGS, train_losses


def test_loss_falls_on_mock_data():
    recs = train_losses(1, ["--train-iters", "40", "--lr", "5e-3", "--lr-warmup-iters", "5"])
    first = recs[0]["lm_loss"]
    last = sum(r["lm_loss"] for r in recs[-5:]) / 5
    assert math.isclose(first, math.log(1024), rel_tol=0.02)  # starts near uniform over the vocab
    assert last < first - 0.5, (first, last)
    assert all(math.isfinite(r["grad_norm"]) for r in recs)


def test_resume_reproduces_uninterrupted_losses_exactly(tmp_path):
    common = ["--lr-decay-iters", "10"]
    full = train_losses(1, common + ["--train-iters", "10"])
    train_losses(1, common + ["--train-iters", "5", "--save", str(tmp_path)])
    assert (tmp_path / "latest").read_text().strip() == "iter_0000005"
    resumed = train_losses(1, common + ["--train-iters", "10", "--load", str(tmp_path)])
    assert [r["iteration"] for r in resumed] == list(range(6, 11))
    for a, b in zip(full[5:], resumed):
        assert a["lm_loss"] == b["lm_loss"] and a["grad_norm"] == b["grad_norm"]  # bit-identical


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    train_losses(1, ["--train-iters", "2", "--save", str(tmp_path)])
    (tmp_path / "iter_0000002" / "rank_00000.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        train_losses(1, ["--train-iters", "3", "--load", str(tmp_path)])


def test_metrics_file_and_tensorboard(tmp_path):
    metrics = tmp_path / "m.jsonl"
    train_losses(1, ["--train-iters", "3", "--metrics-file", str(metrics),
                     "--tensorboard-dir", str(tmp_path / "tb")])
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "tokens_per_sec", "mfu",
                "load_imbalance"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["aux_loss"] > 1.0  # ~top-k when balanced: the per-layer mean is logged
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


@pytest.mark.parametrize("style, expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 0.55, 0.1]),
    ("cosine", [0.5, 1.0, 0.55, 0.1]),
])
def test_lr_schedules(style, expected):
    cfg = TrainConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=2, train_iters=4, lr_decay_iters=4,
                      lr_decay_style=style)
    got = [learning_rate(cfg, it) for it in (1, 2, 3, 4)]
    assert got == pytest.approx(expected)


def test_inverse_square_root():
    cfg = TrainConfig(lr=1.0, lr_warmup_iters=4, lr_decay_style="inverse-square-root")
    assert learning_rate(cfg, 16) == pytest.approx(0.5)


def test_bf16_flag_parses_and_fp32_is_default():
    assert not parse_args(TINY_ARGS).train.bf16
    assert parse_args(TINY_ARGS + ["--bf16"]).train.bf16
    assert torch.get_default_dtype() == torch.float32


def test_exit_interval_saves_and_stops(tmp_path):
    recs = train_losses(1, ["--train-iters", "10", "--exit-interval", "3", "--save", str(tmp_path)])
    assert [r["iteration"] for r in recs] == [1, 2, 3]
    assert (tmp_path / "latest").read_text().strip() == "iter_0000003"


def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train_losses(1, ["--train-iters", "2", "--wandb-project", "megamoe-test"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_signal_handlers_are_restored_after_training():
    # A handler left installed keeps the trainer (and its process groups) alive into interpreter
    # shutdown, where gloo's threads abort the process while releasing them (exit code -6).
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    train_losses(1, ["--train-iters", "1"])
    assert {s: signal.getsignal(s) for s in before} == before


def test_console_line_shows_pipeline_idle_and_all_to_all_only_when_present():
    from megamoe.training.metrics import format_line

    rec = dict(iteration=1, consumed_samples=8, step_time=0.1, lr=1e-3, lm_loss=7.0, aux_loss=2.0, z_loss=4.0,
               grad_norm=1.0, tokens_per_sec=1000, tflops=0.01, mfu=0.1, load_imbalance=1.2)
    assert "pipeline idle" not in format_line(rec, 10) and "a2a" not in format_line(rec, 10)
    line = format_line(dict(rec, pp_idle_frac=0.25, a2a_bytes_intra=2**20, a2a_bytes_inter=0,
                            a2a_msgs_intra=4, a2a_msgs_inter=0), 10)
    assert "pipeline idle: 25.0%" in line and "a2a sent intra/inter: 1.00/0.00 MiB in 4/0 msgs" in line


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234"),
     "rank 3 lost the job: a peer rank died (connection lost)"),
    (RuntimeError("[Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, "
                  "OpType=ALLREDUCE) ran for 600000 milliseconds before timing out."),
     "rank 3 lost the job: a peer did not answer within --distributed-timeout-minutes 10.0"),
    (RuntimeError("NCCL communicator was aborted on rank 3."),
     "rank 3 lost the job: NCCL's watchdog aborted the communicators"),
    (torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error "
                                        "(run with NCCL_DEBUG=INFO for details), NCCL version 2.21.5"),
     "rank 3: distributed backend error (DistBackendError): NCCL error in"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (NCCL buffers)"), None),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), None),
])
def test_distributed_failures_are_reported_as_what_they_are(error, expected):
    from megamoe.training.run import describe_distributed_failure

    message = describe_distributed_failure(error, 3, 10.0)
    if expected is None:
        assert message is None  # not a distributed failure: re-raised as it is
    else:
        assert message.startswith(expected) and "\n" not in message
