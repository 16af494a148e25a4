"""Test harness: run a function on N fork-started gloo ranks (``run_ranks``, from
megamoe.parallel.forked, which the planner's calibration uses too), and train openmoe-tiny under a
layout (``train_losses``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from megamoe.parallel.forked import run_ranks


def _warm_up_lazy_imports() -> None:
    """Import what torch loads lazily on first backward / assert_close (sympy & co., ~2-4 s of CPU)
    once in the parent, so fork-started ranks inherit it instead of each paying it again."""
    import torch.fx.experimental.symbolic_shapes  # noqa: F401

    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2,), 2.0))


_warm_up_lazy_imports()


TINY_ARGS = ["--model-preset", "openmoe-tiny", "--mock-data", "--seq-length", "32",
             "--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "3e-3",
             "--lr-warmup-iters", "2", "--train-iters", "10", "--log-interval", "1000",
             "--eval-interval", "100000", "--clip-grad", "1.0"]


def _train_rank(rank: int, world: int, argv: Sequence[str], placement: Any = None) -> list[dict[str, Any]]:
    from megamoe.arguments import parse_args
    from megamoe.parallel.mesh import ParallelMesh
    from megamoe.training.run import pretrain

    cfg = parse_args(list(argv))
    mesh = ParallelMesh.from_config(cfg.parallel, world, rank)
    mesh.build_groups()
    return pretrain(cfg, mesh, placement=placement)


def train_losses(world: int, extra_args: Sequence[str] = (), base_args: Sequence[str] = TINY_ARGS,
                 placement: Any = None) -> list[dict[str, Any]]:
    """Train openmoe-tiny under a layout (flags in extra_args, optionally an expert placement table)
    on ``world`` ranks; rank 0's per-iteration records."""
    argv = list(base_args) + list(extra_args)
    if world == 1:
        torch.set_num_threads(1)
        return _train_rank(0, 1, argv, placement)
    return run_ranks(world, _train_rank, argv, placement)[0]
