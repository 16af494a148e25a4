"""Issue 17, data loss: a save never touches the previous good copy until the new one is complete, a
--load that finds nothing says so, and a run never writes into another run's checkpoint directory."""

import os

import pytest
import torch

from megamoe.arguments import parse_args
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.optimizer import build_optimizer
from megamoe.training import checkpoint
from megamoe.training.checkpoint import CheckpointError, TrainState, load_checkpoint, save_checkpoint
from megamoe.training.run import build_model
from tests.conftest import poison_expert_grads
from tests.harness import TINY_ARGS, train_losses

SHORT = ["--train-iters", "3", "--lr-decay-iters", "6"]


def _setup():
    cfg = parse_args(TINY_ARGS)
    mesh = ParallelMesh.from_config(cfg.parallel, 1, 0)
    mesh.build_groups()
    model = build_model(cfg, mesh, torch.device("cpu"))
    return cfg, mesh, model, build_optimizer(model, cfg, mesh)


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_failed_resave_of_an_iteration_keeps_the_previous_copy(tmp_path, monkeypatch):
    cfg, mesh, model, opt = _setup()
    save_checkpoint(str(tmp_path), TrainState(5, 40), model, opt, cfg, mesh)
    saved = _weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def dies(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_rank_file", dies)  # the disk fills during the re-save
    with pytest.raises(CheckpointError, match="failed on rank 0: No space left on device; the previous"):
        save_checkpoint(str(tmp_path), TrainState(5, 40), model, opt, cfg, mesh)
    monkeypatch.undo()
    _, _, fresh, fresh_opt = _setup()
    assert load_checkpoint(str(tmp_path), fresh, fresh_opt, mesh, cfg).iteration == 5
    assert all(torch.equal(a, b) for a, b in zip(saved, _weights(fresh)))


def test_resave_cut_between_its_renames_falls_back_to_the_previous_copy(tmp_path, monkeypatch):
    cfg, mesh, model, opt = _setup()
    save_checkpoint(str(tmp_path), TrainState(5, 40), model, opt, cfg, mesh)
    real_replace = os.replace

    def killed_after_moving_aside(src, dst):
        real_replace(src, dst)
        if dst.endswith(".old"):
            raise KeyboardInterrupt  # the process dies right after the old copy moved aside

    monkeypatch.setattr(checkpoint.os, "replace", killed_after_moving_aside)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), TrainState(5, 40), model, opt, cfg, mesh)
    monkeypatch.undo()
    assert not (tmp_path / "iter_0000005").exists() and (tmp_path / "iter_0000005.old").is_dir()
    _, _, fresh, fresh_opt = _setup()
    assert load_checkpoint(str(tmp_path), fresh, fresh_opt, mesh, cfg).iteration == 5


def test_load_of_a_file_is_a_one_line_error(tmp_path):
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    with pytest.raises(CheckpointError, match="is a file") as err:
        train_losses(1, SHORT + ["--load", str(target)])
    assert "\n" not in str(err.value)


def test_load_that_finds_nothing_warns_and_starts_from_scratch(tmp_path, capsys):
    recs = train_losses(1, SHORT + ["--load", str(tmp_path / "typo")])
    assert len(recs) == 3 and recs[0]["iteration"] == 1
    assert "WARNING: no checkpoint in --load" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert len(train_losses(1, SHORT + ["--load", str(tmp_path / "empty")])) == 3
    assert "WARNING: no checkpoint in --load" in capsys.readouterr().out
    train_losses(1, SHORT + ["--load", str(tmp_path / "auto"), "--save", str(tmp_path / "auto")])
    assert "WARNING" not in capsys.readouterr().out  # --load = --save: the auto-resume pattern


def test_a_new_run_does_not_write_into_another_runs_checkpoints(tmp_path):
    first = train_losses(1, SHORT + ["--save", str(tmp_path)])
    def snapshot():
        return (tmp_path / "latest").read_text(), os.path.getmtime(tmp_path / "iter_0000003" / "meta.json")

    before = snapshot()
    with pytest.raises(CheckpointError, match="already holds checkpoints of another run") as err:
        train_losses(1, SHORT + ["--save", str(tmp_path), "--seed", "7"])  # no --load: another run
    assert "--allow-existing-save-dir" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="already holds iter_0000003 of another run"):
        train_losses(1, SHORT + ["--save", str(tmp_path), "--seed", "7", "--allow-existing-save-dir"])
    assert snapshot() == before
    # relaunching the finished run resumes, trains nothing and does not save its iteration again
    again = train_losses(1, SHORT + ["--save", str(tmp_path), "--load", str(tmp_path)])
    assert again == [] and snapshot() == before
    assert first[-1]["iteration"] == 3


def test_save_into_a_file_fails_before_step_one(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(CheckpointError, match="--save .* is a file"):
        train_losses(1, SHORT + ["--save", str(target)])


def test_every_step_skipped_stops_with_one_line(tmp_path, monkeypatch, capsys):
    from megamoe.training.run import main

    poison_expert_grads(monkeypatch, lambda n: True)
    rc = main(TINY_ARGS + ["--max-consecutive-skipped-steps", "3", "--save", str(tmp_path)])
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "3 steps in a row had a non-finite gradient norm" in errors[0]
    assert not (tmp_path / "latest").exists()  # nothing saved


def test_non_finite_weights_are_never_saved_and_refused_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg, mesh, model, opt = _setup()
    save_checkpoint(str(tmp_path), TrainState(1, 8), model, opt, cfg, mesh)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="holds NaN or Inf; the previous checkpoint is intact"):
        save_checkpoint(str(tmp_path), TrainState(2, 16), model, opt, cfg, mesh)
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    # a checkpoint that holds NaN (written by something else): one line naming the tensor at load
    path = tmp_path / "iter_0000001" / "rank_00000.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.startswith("weight/lm_head"))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, path, metadata={"format": "1"})
    _, _, fresh, fresh_opt = _setup()
    with pytest.raises(CheckpointError, match="weight lm_head.weight holds NaN or Inf") as err:
        load_checkpoint(str(tmp_path), fresh, fresh_opt, mesh, cfg)
    assert "--allow-nonfinite-load" in str(err.value) and "\n" not in str(err.value)
    assert load_checkpoint(str(tmp_path), fresh, fresh_opt, mesh, cfg, allow_nonfinite=True).iteration == 1


def test_checkpoint_of_another_vocabulary_is_a_one_line_error(tmp_path):
    train_losses(1, SHORT + ["--vocab-size", "520", "--save", str(tmp_path)])
    with pytest.raises(CheckpointError, match="has vocab-size 520, this run 1024"):
        train_losses(1, SHORT + ["--load", str(tmp_path)])


@pytest.mark.parametrize("env, extra, message", [
    ({"RANK": "0", "WORLD_SIZE": "abc"}, [], "WORLD_SIZE='abc' is not an integer"),
    ({"RANK": "5", "WORLD_SIZE": "2"}, [], "rank 5 of world size 2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": None}, [], "MASTER_ADDR is not set"),
    ({}, ["--metrics-file", "{tmp}"], "is a directory"),
    ({}, ["--tensorboard-dir", "{tmp}/file"], "is a file"),
    ({}, ["--save", "{tmp}/file/ckpt"], "which is a file"),
    ({}, ["--save", "/proc/megamoe/ckpt"], "--save /proc/megamoe/ckpt cannot be created"),
    ({}, ["--moe-ranks-per-node", "3"], "ranks per node 3 does not tile world size 1"),
], ids=["world-abc", "rank-out-of-range", "no-master-addr", "metrics-dir", "tensorboard-file",
        "save-under-file", "save-unwritable", "ranks-per-node"])
def test_launch_and_output_path_errors_are_one_line_before_step_one(tmp_path, monkeypatch, capsys, env,
                                                                      extra, message):
    from megamoe.training.run import main

    (tmp_path / "file").write_text("x")
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    rc = main(TINY_ARGS + [a.replace("{tmp}", str(tmp_path)) for a in extra])
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(out) == 1 and message in out[0], out


def _save_with_full_disk_on_rank_1(rank, world, directory):
    import torch.distributed as dist

    from megamoe.training import safetensors_stream

    cfg = parse_args(TINY_ARGS + ["--use-distributed-optimizer"])
    mesh = ParallelMesh.from_config(cfg.parallel, world, rank)
    mesh.build_groups()
    model = build_model(cfg, mesh, torch.device("cpu"))
    opt = build_optimizer(model, cfg, mesh)
    save_checkpoint(directory, TrainState(1, 8), model, opt, cfg, mesh)
    if rank == 1:  # the disk fills while this rank writes; it still takes part in the state gathering
        def full(self, *_args, **_kwargs):
            raise OSError(28, "No space left on device")

        safetensors_stream.StreamingSafetensors.write_range = full
    try:
        save_checkpoint(directory, TrainState(2, 16), model, opt, cfg, mesh)
    except CheckpointError as e:
        message = str(e)
    dist.barrier()
    return message


def test_a_failed_save_on_one_rank_is_one_line_on_every_rank(tmp_path):
    from tests.harness import run_ranks

    messages = run_ranks(2, _save_with_full_disk_on_rank_1, str(tmp_path), timeout=120)
    for message in messages:  # every rank reports it, none waits for ever
        assert message.startswith(f"saving iteration 2 to {tmp_path} failed on rank 1")
        assert message.endswith("; the previous checkpoint is intact") and "\n" not in message
    assert "No space left on device" in messages[1]  # the rank that failed says why
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest"]  # no .tmp left


@pytest.mark.parametrize("edit, message", [
    (lambda meta: [meta], "holds a list, not an object"),
    (lambda meta: {**meta, "iteration": "x"}, "iteration is 'x', not a non-negative integer"),
    (lambda meta: {k: v for k, v in meta.items() if k != "config"}, "has no model config"),
    (lambda meta: {**meta, "placement": {"ep_size": 1, "rank_of": [0, 0], "slot_of": [0, 1]}},
     "expert placement that is not a table of 8 experts"),
], ids=["list", "iteration-not-int", "no-config", "placement-wrong-size"])
def test_garbled_meta_json_is_one_line_for_load_and_checkpoint_info(tmp_path, capsys, edit, message):
    import json
    import subprocess
    import sys

    train_losses(1, SHORT + ["--save", str(tmp_path)])
    meta_path = tmp_path / "iter_0000003" / "meta.json"
    meta_path.write_text(json.dumps(edit(json.loads(meta_path.read_text()))))
    with pytest.raises(CheckpointError, match=message) as err:
        train_losses(1, SHORT + ["--load", str(tmp_path), "--save", str(tmp_path)])
    assert "\n" not in str(err.value)
    info = subprocess.run([sys.executable, "tools/checkpoint_info.py", str(tmp_path)], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert info.returncode == 1 and message in info.stderr and len(info.stderr.strip().splitlines()) == 1


def test_a_model_too_large_to_allocate_is_one_line(capsys):
    from megamoe.training.run import main

    rc = main(TINY_ARGS + ["--vocab-size", "100000000000"])
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "does not fit in memory on rank 0" in errors[0]


def test_warmup_longer_than_training_is_noted(capsys):
    train_losses(1, ["--train-iters", "2", "--lr-warmup-iters", "5"])
    note = "--lr-warmup-iters 5 >= --train-iters 2: the learning rate never reaches --lr"
    assert note in capsys.readouterr().out


def test_a_failing_metrics_file_does_not_stop_training(tmp_path, monkeypatch, capsys):
    import io

    from megamoe.training import metrics

    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics, "open", lambda *_a, **_k: FullDisk(), raising=False)
    recs = train_losses(1, SHORT + ["--metrics-file", str(tmp_path / "m.jsonl")])
    assert len(recs) == 3  # all steps trained
    warnings = [line for line in capsys.readouterr().out.splitlines() if "--metrics-file" in line]
    assert len(warnings) == 1 and "write failed (No space left on device)" in warnings[0]
