"""Run a function on N fork-started gloo ranks of this machine: the tests', the benchmarks' and the
planner calibration's way to try a layout on CPU.

``run_ranks(n, fn, *args)`` starts n processes (fork: ~0.1 s each), one thread each, joined into a
gloo process group through a file rendezvous, runs ``fn(rank, world_size, *args)`` on each and returns
the per-rank results. A rank that raises or dies fails the whole call with its traceback; a hang
fails after ``timeout`` seconds instead of blocking its caller.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


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
