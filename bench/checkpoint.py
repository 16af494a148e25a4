"""Checkpoint save and load time and bytes for openmoe-tiny at world 8 (TP2+SP x EP2 x PP2, ZeRO),
and loading that checkpoint under other layouts.

    PYTHONPATH=. python bench/checkpoint.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from megamoe.arguments import parse_args
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.optimizer import build_optimizer
from megamoe.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from megamoe.training.run import build_stage_model
from tests.harness import TINY_ARGS, run_ranks

SAVE_LAYOUT = ["--tensor-model-parallel-size", "2", "--sequence-parallel",
               "--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
               "--use-distributed-optimizer", "--global-batch-size", "16"]


def _setup(rank: int, world: int, layout: list[str]):
    cfg = parse_args(TINY_ARGS + layout)
    mesh = ParallelMesh.from_config(cfg.parallel, world, rank)
    mesh.build_groups()
    model = build_stage_model(cfg, mesh)
    model.init_weights(1)
    return cfg, mesh, model, build_optimizer(model, cfg, mesh)


def _save(rank: int, world: int, directory: str, reps: int) -> list[float]:
    import torch.distributed as dist

    cfg, mesh, model, opt = _setup(rank, world, SAVE_LAYOUT)
    times = []
    for i in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        save_checkpoint(directory, TrainState(i + 1, 16 * (i + 1)), model, opt, cfg, mesh)
        times.append(time.perf_counter() - t0)
    return times


def _load(rank: int, world: int, directory: str, layout: list[str], reps: int) -> list[float]:
    cfg, mesh, model, opt = _setup(rank, world, layout)
    times = []
    for _ in range(reps):
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        t0 = time.perf_counter()
        load_checkpoint(directory, model, opt, mesh, cfg)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        save = run_ranks(8, _save, d, args.reps)
        latest = os.path.join(d, open(os.path.join(d, "latest")).read().strip())
        size = sum(os.path.getsize(os.path.join(latest, f)) for f in os.listdir(latest))
        print("| operation | layout | ranks | median s (slowest rank) | bytes |\n|---|---|---:|---:|---:|")
        print(f"| save | TP2+SP, EP2, PP2, ZeRO | 8 | {statistics.median(max(t) for t in zip(*save)):.3f} "
              f"| {size:,} |")
        for world, name, layout in [
                (8, "same", SAVE_LAYOUT), (8, "EP4 x DP2, ZeRO", ["--expert-model-parallel-size", "4",
                                                                   "--use-distributed-optimizer"]),
                (1, "single process", [])]:
            res = _load(0, 1, d, layout, args.reps) if world == 1 else run_ranks(world, _load, d, layout,
                                                                                   args.reps)
            res = [res] if world == 1 else res
            print(f"| load | {name} | {world} | {statistics.median(max(t) for t in zip(*res)):.3f} | |")


if __name__ == "__main__":
    main()
