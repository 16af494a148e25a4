"""Checkpoints: atomic, resumable, loaded with safe (weights-only) deserialisation.

Layout of ``--save DIR``::

    DIR/iter_0000100/rank_00000.pt   model + optimizer state of each rank
    DIR/iter_0000100/meta.json       iteration, consumed samples, world size, config
    DIR/latest                       "iter_0000100", written last

A save goes to ``iter_XXXXXXX.tmp`` and is renamed when every rank has written, then ``latest`` is
replaced atomically, so a crash mid-save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megamoe.config import Config


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable (one-line message)."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str, state: TrainState, model: nn.Module,
                    optimizer: torch.optim.Optimizer, cfg: Config, rank: int = 0,
                    world_size: int = 1) -> str:
    """Write the checkpoint of ``state.iteration``; every rank calls it. Returns its directory."""
    name = f"iter_{state.iteration:07d}"
    final, tmp = os.path.join(directory, name), os.path.join(directory, name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(world_size)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "rng": {"torch": torch.get_rng_state()}}
    torch.save(payload, os.path.join(tmp, f"rank_{rank:05d}.pt"))
    if rank == 0:
        meta = {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
                "world_size": world_size, "config": dataclasses.asdict(cfg)}
        _atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
    _barrier(world_size)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(os.path.join(directory, "latest"), name + "\n")
    _barrier(world_size)
    return final


def resolve_checkpoint(directory: str) -> str | None:
    """The checkpoint directory ``latest`` points to, None if DIR has no checkpoint yet."""
    if not os.path.isdir(directory):
        return None
    if os.path.isfile(os.path.join(directory, "meta.json")):
        return directory  # pointed straight at an iter_* directory
    pointer = os.path.join(directory, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(directory, name)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        raise CheckpointError(f"checkpoint {path} named by {pointer} is missing or incomplete; "
                              "point --load at an intact iter_* directory")
    return path


def load_checkpoint(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    rank: int = 0, world_size: int = 1) -> TrainState | None:
    """Restore model/optimizer/RNG from ``directory`` (or its ``latest``); None if there is none."""
    path = resolve_checkpoint(directory)
    if path is None:
        return None
    with open(os.path.join(path, "meta.json")) as f:
        meta: dict[str, Any] = json.load(f)
    if meta["world_size"] != world_size:
        raise CheckpointError(f"checkpoint {path} was saved by {meta['world_size']} ranks, this run "
                              f"has {world_size}; relaunch with the saved layout")
    file = os.path.join(path, f"rank_{rank:05d}.pt")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file {file} is missing") from e
    except Exception as e:  # truncated / corrupt pickle
        raise CheckpointError(f"checkpoint file {file} is corrupt ({type(e).__name__}: {e})") from e
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"]["torch"])
    return TrainState(iteration=int(meta["iteration"]),
                      consumed_samples=int(meta["consumed_samples"]))
