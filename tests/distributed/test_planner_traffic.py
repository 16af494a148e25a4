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

from typing import Any

import numpy as np
import pytest

from megamoe.arguments import parse_args
from megamoe.planner.traffic import exchange_traffic, expected_counts
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
