"""Test harness: run a function on N fork-started gloo ranks, and train openmoe-tiny under a layout.

``run_ranks(n, fn, *args)`` starts n processes (fork: ~0.1 s each), one thread each, joined into a
gloo process group through a file rendezvous, runs ``fn(rank, world_size, *args)`` on each and returns
the per-rank results. A rank that raises or dies fails the whole call with its traceback; a hang
fails after ``timeout`` seconds instead of blocking the suite.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist


def _warm_up_lazy_imports() -> None:
    """Import what torch loads lazily on first backward / assert_close (sympy & co., ~2-4 s of CPU)
    once in the parent, so fork-started ranks inherit it instead of each paying it again."""
    import torch.fx.experimental.symbolic_shapes  # noqa: F401

    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2,), 2.0))


_warm_up_lazy_imports()


def _worker(rank: int, world: int, init_file: str, fn: Callable, args: tuple, out: mp.Queue) -> None:
    try:
        torch.set_num_threads(1)
        if world > 1:
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                    world_size=world, timeout=datetime.timedelta(seconds=120))
        result = fn(rank, world, *args)
        out.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        out.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn: Callable, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` fork-started ranks; return results by rank."""
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world, init_file, fn, args, out), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        try:
            while len(results) < world:
                try:
                    rank, status, payload = out.get(timeout=timeout)
                except queue.Empty as e:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    raise RuntimeError(f"ranks timed out after {timeout}s (dead ranks: {dead})") from e
                if status == "error":
                    raise RuntimeError(f"rank {rank} failed:\n{payload}")
                results[rank] = payload
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world)]


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
