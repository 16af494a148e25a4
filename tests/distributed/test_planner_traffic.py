"""The planner's expert-exchange model against megamoe's own counters (issue 19, "Must show").

Each case trains openmoe-tiny for 2 steps on forked gloo ranks and records, on every rank and for
every counted MoE layer call (recomputed forwards are not counted, as in MoEStats), the rows it
dispatched to each expert per chunk: the dispatcher's host copy of the all-gathered counts. The
prediction of ``megamoe.planner.traffic.exchange_traffic`` from those counts must equal each rank's
``a2a_*`` counters of each step exactly, for flat, hierarchical (2 emulated nodes via
--moe-ranks-per-node), TP-deduplicated and chunked exchanges. The same counts also check the expected
path's token totals (every dispatched token makes top-k assignments: dropless).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

from megamoe.arguments import parse_args
from megamoe.planner.step_traffic import step_collectives
from megamoe.planner.traffic import exchange_traffic, expected_counts, layout_mesh
from tests.harness import TINY_ARGS, run_ranks

ITERS = 2
ARGS = [*TINY_ARGS, "--train-iters", str(ITERS)]
EP, TP, PP = "--expert-model-parallel-size", "--tensor-model-parallel-size", "--pipeline-model-parallel-size"
HIER, RPN, CHUNKS = "--moe-hierarchical-alltoall", "--moe-ranks-per-node", "--moe-alltoall-chunks"


def _train_recording(rank: int, world: int, argv: list[str]) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Train, recording this rank's [K, E] dispatched rows of every counted MoE layer call (positions
    are expert ids: the placement is contiguous) -> (calls in order, per-step records)."""
    from megamoe.moe import dispatcher
    from tests.harness import _train_rank

    calls: list[np.ndarray] = []
    last: dict[str, list] = {}
    host_counts, plan = dispatcher._host_counts, dispatcher.TokenDispatcher._plan

    def spy_host_counts(counts):
        last["host"] = host_counts(counts)  # [EP source][K][EP destination][E_local]
        return last["host"]

    def spy_plan(self, x, routing):
        out = plan(self, x, routing)
        if self.stats.live_comm is not None:  # counted (not a recomputation)
            mine = np.asarray(last["host"][self.topo.index])  # [K, EP, E_local]
            calls.append(mine.reshape(mine.shape[0], -1))
        return out

    dispatcher._host_counts, dispatcher.TokenDispatcher._plan = spy_host_counts, spy_plan
    try:
        return calls, _train_rank(rank, world, argv)
    finally:
        dispatcher._host_counts, dispatcher.TokenDispatcher._plan = host_counts, plan


CASES = {
    "flat-ep4": (4, [EP, "4"]),
    "flat-ep4-2nodes": (4, [EP, "4", RPN, "2"]),
    "hierarchical-2nodes": (4, [EP, "4", HIER, RPN, "2"]),
    "tp2-dedup": (4, [EP, "2", TP, "2", RPN, "2"]),
    "tp2-no-dedup": (4, [EP, "2", TP, "2", "--no-moe-tp-dedup"]),
    "chunks3-2nodes": (4, [EP, "4", CHUNKS, "3", RPN, "2"]),
    "hierarchical-chunks2": (4, [EP, "4", HIER, RPN, "2", CHUNKS, "2"]),
    "pp2-ep2-2nodes": (4, [PP, "2", EP, "2", RPN, "2"]),  # each stage's EP group exchanges its layer
}


@pytest.mark.parametrize("case", list(CASES))
def test_predicted_exchange_equals_counters(case):
    world, extra = CASES[case]
    argv = ARGS + extra
    cfg = parse_args(argv)
    results = run_ranks(world, _train_recording, argv)
    per_rank_calls = [calls for calls, _ in results]
    n_calls = len(per_rank_calls[0])
    assert n_calls > 0 and n_calls % ITERS == 0
    assert all(len(calls) == n_calls for calls in per_rank_calls)
    per_step = n_calls // ITERS  # MoE layers x micro-batches
    expected_rows = expected_counts(cfg, world).sum(axis=(1, 2))  # [world] per call
    some_inter = False
    for step in range(ITERS):
        predicted = None
        for call in range(step * per_step, (step + 1) * per_step):
            counts = np.stack([calls[call] for calls in per_rank_calls])  # [world, K, E]
            # dropless: every dispatched token made top-k assignments, as the expected path assumes
            np.testing.assert_array_equal(counts.sum(axis=(1, 2)), expected_rows)
            assert counts.shape[1] == cfg.parallel.moe_alltoall_chunks
            traffic = exchange_traffic(cfg, world, world, counts)
            predicted = traffic if predicted is None else [a + b for a, b in zip(predicted, traffic)]
        for rank, (_, records) in enumerate(results):
            measured = {k: v for k, v in records[step].items() if k.startswith("a2a_")}
            assert predicted[rank].counters() == measured, (case, step, rank)
            assert measured["a2a_msgs_intra"] + measured["a2a_msgs_inter"] > 0
            some_inter |= measured["a2a_bytes_inter"] > 0
    assert some_inter == (RPN in extra and not case.startswith(("tp2", "pp2"))), case  # groups of 2: one node


# -- every other collective: the shape-derived plan against the calls a real step makes ----------------
def _train_spying(rank: int, world: int, argv: list[str]) -> list[Counter]:
    """Train, recording per step every collective call this rank makes except the all-to-alls
    (checked above) and the scalar bookkeeping reductions the model leaves out (world-group flags and
    grad norm, fp64 logged losses, the one-element load-imbalance max): Counter of
    (op, group ranks or send peer, bytes) -> calls, one per step."""
    import torch
    import torch.distributed as dist

    from megamoe.parallel import comm, grad_buffer, optimizer
    from megamoe.training import loop
    from tests.harness import _train_rank

    steps: list[Counter] = []
    saved = [(dist, "all_reduce"), (dist, "batch_isend_irecv"), (comm, "_all_gather_single"),
             (optimizer, "_all_gather_single"), (comm, "_reduce_scatter_single"),
             (grad_buffer, "_reduce_scatter_single"), (loop.Trainer, "train_step")]
    originals = [getattr(obj, name) for obj, name in saved]
    all_reduce, batch, gather, _, scatter, _, train_step = originals

    def note(key: tuple) -> None:
        if steps:
            steps[-1][key] += 1

    def spy_all_reduce(t, *args, group=None, **kwargs):
        if group is not None and t.dtype != torch.float64 and t.numel() > 1:
            note(("all_reduce", tuple(dist.get_process_group_ranks(group)), t.nbytes))
        return all_reduce(t, *args, group=group, **kwargs)

    def spy_gather(out, inp, group=None, **kwargs):
        note(("all_gather", tuple(dist.get_process_group_ranks(group)), out.nbytes))
        return gather(out, inp, group=group, **kwargs)

    def spy_scatter(out, inp, group=None, **kwargs):
        note(("reduce_scatter", tuple(dist.get_process_group_ranks(group)), inp.nbytes))
        return scatter(out, inp, group=group, **kwargs)

    def spy_batch(ops):
        for op in ops:
            if op.op is dist.isend:
                note(("send", op.peer, op.tensor.nbytes))
        return batch(ops)

    def spy_step(self):
        steps.append(Counter())
        return train_step(self)

    spies = [spy_all_reduce, spy_batch, spy_gather, spy_gather, spy_scatter, spy_scatter, spy_step]
    for (obj, name), spy in zip(saved, spies):
        setattr(obj, name, spy)
    try:
        _train_rank(rank, world, argv)
        return steps
    finally:
        for (obj, name), original in zip(saved, originals):
            setattr(obj, name, original)


def _predicted_calls(cfg, world: int, rank: int) -> Counter:
    """step_collectives of ``rank`` as (op, group ranks or send peer, bytes) -> calls per step."""
    grids = layout_mesh(cfg, world, world).grids()
    calls: Counter = Counter()
    for phases in step_collectives(cfg, world, rank).values():
        for coll in (c for colls in phases.values() for c in colls):
            members = next(g for g in grids[coll.group] if rank in g)
            peer = members[(members.index(rank) + coll.peer) % len(members)]
            where = peer if coll.op == "send" else tuple(members)
            calls[(coll.op, where, coll.nbytes)] += coll.count
    return calls


SP, Z, RC = "--sequence-parallel", "--use-distributed-optimizer", "--recompute-granularity"
COLLECTIVE_CASES = {
    "tp2-pp2": [TP, "2", PP, "2"],
    "tp2-sp-ep2-zero1": [TP, "2", SP, EP, "2", Z, "--global-batch-size", "16"],
    "tp2-dedup-ep2-dp2-recompute": [TP, "2", EP, "2", RC, "full", "--recompute-num-layers", "2"],
    "pp2-interleaved-ep2-zero2-bf16-buckets": [PP, "2", "--num-layers-per-virtual-pipeline-stage", "1",
                                              EP, "2", Z, "--zero-stage", "2", "--bf16",
                                              "--ddp-bucket-size", "20000"],
    "ep4-dp4-allreduce": [EP, "4"],
    # MoE closes every Mixtral layer: the recomputation stops before TP-dedup's output gather
    "mixtral-tp2-dedup-ep2-recompute-block": ["--model-preset", "mixtral-tiny", TP, "2", EP, "2", RC, "full",
                                              "--recompute-method", "block", "--recompute-num-layers", "1"],
}


@pytest.mark.parametrize("case", list(COLLECTIVE_CASES))
def test_predicted_collectives_equal_the_calls_of_a_real_step(case):
    argv = ARGS + COLLECTIVE_CASES[case]
    cfg = parse_args(argv).validate(4)
    for rank, steps in enumerate(run_ranks(4, _train_spying, argv)):
        assert len(steps) == ITERS
        predicted = _predicted_calls(cfg, 4, rank)
        assert predicted, (case, rank)
        for measured in steps:
            assert dict(measured) == dict(predicted), (case, rank)
