"""The planner's memory model (megamoe/planner/memory.py) against real runs of openmoe-tiny on forked
gloo ranks: model-state bytes EQUAL the optimizer's accounting (memory_bytes) and the nbytes of the
real gradient buffers, masters and AdamW moments on every rank; saved activations per micro-batch
within 10% of the bytes autograd really saves (each storage once, parameters excluded); and under
1F1B with PP 2 the peak of saved bytes over a step and the micro-batches in flight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from megamoe.arguments import parse_args
from megamoe.buffer_pool import EXPERT_BUFFERS
from megamoe.planner.memory import chunk_activation_bytes, data_parallel_sizes, pipeline_peak, state_bytes
from tests.conftest import EP, PP, TP, Z, train_and_inspect
from tests.harness import TINY_ARGS, run_ranks

ONE_STEP = ["--train-iters", "1", "--ddp-bucket-size", "1000"]  # small buckets: padding matters
Z2 = [Z, "--zero-stage", "2"]
SP = ["--sequence-parallel"]
ODD = ["--hidden-size", "30", "--ffn-hidden-size", "42", "--no-moe-grouped-gemm"]  # padded buckets


class SavedBytes:
    """Saved-tensor hooks counting each storage once (parameters excluded): ``live`` bytes held for
    backward now, ``peak`` the most at once, ``total`` every distinct storage ever saved."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [holders, bytes]
        self.live = self.peak = self.total = 0

    def _pack(self, t: torch.Tensor) -> object:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.params:
            return t
        meter = self
        if key not in self.refs:
            self.refs[key] = [0, storage.nbytes()]
            self.live += storage.nbytes()
            self.total += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key][0] += 1

        class Held:
            def __init__(self) -> None:
                self.t = t

            def __del__(self) -> None:
                ref = meter.refs[key]
                ref[0] -= 1
                if ref[0] == 0:
                    meter.live -= ref[1]
                    del meter.refs[key]

        return Held()

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(
            self._pack, lambda held: held if isinstance(held, torch.Tensor) else held.t)


# -- model state: exact -------------------------------------------------------------------------------
def _real_state(trainer: Any) -> dict[str, Any]:
    """What this rank holds after a step: memory_bytes() and the nbytes of the real tensors."""
    opt, mesh = trainer.optimizer, trainer.mesh
    moments = sum(s[k].nbytes for s in opt.inner.state.values() for k in ("exp_avg", "exp_avg_sq"))
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    real = dict(params=sum(p.numel() * p.element_size() for p in trained),
                grads=sum(b.data.nbytes for b in opt.buffers),
                master=sum(piece.master.nbytes for piece in opt.pieces if not piece.is_view),
                optimizer=moments)
    return dict(accounted=opt.memory_bytes(), real=real, coords=(mesh.pp_rank, mesh.coord("dp"),
                                                               mesh.coord("edp")))


@pytest.mark.parametrize("world, extra", [
    (2, [EP, "2"]),  # no ZeRO: every rank owns all of its parameters
    (4, [Z, EP, "2"] + ODD),  # ZeRO-1, DP 4 x EDP 2
    (4, Z2 + [EP, "2"] + ODD),  # ZeRO-2: owned grads + transient buckets
    (4, [Z, TP, "2", EP, "2"] + ODD),  # TP-split dense weights, DP 2, EDP 2
    (4, Z2 + [PP, "2", EP, "2", "--bf16"] + ODD),  # two stages; bf16 weights with fp32 masters and router
], ids=["ep2-plain", "zero1-dp4-ep2", "zero2-dp4-ep2", "zero1-tp2-ep2", "zero2-pp2-ep2-bf16"])
def test_state_bytes_equal_the_optimizers_accounting(world, extra):
    argv = TINY_ARGS + ONE_STEP + extra
    cfg = parse_args(argv)
    for seen, _ in run_ranks(world, train_and_inspect, argv, _real_state):
        pp_rank, dp_rank, edp_rank = seen["coords"]
        predicted = state_bytes(cfg, world, pp_rank, dp_rank, edp_rank)
        accounted = seen["accounted"]
        expected = dict(params=predicted.params, grads=predicted.grads, master=predicted.master,
                        optimizer=predicted.optimizer)
        if "grad_buckets" in accounted:
            expected["grad_buckets"] = predicted.grad_buckets
        else:
            assert predicted.grad_buckets == 0
        assert accounted == expected, seen["coords"]
        assert seen["real"] == {k: expected[k] for k in seen["real"]}, seen["coords"]
        assert predicted.master > 0 if "--bf16" in extra else predicted.master == 0
    dp = data_parallel_sizes(cfg, world)[0]
    if ODD[1] in extra and dp == 4:  # DP 4 pads buckets: the last DP member owns less than the first
        last = dp - 1
        assert state_bytes(cfg, world, 0).optimizer > state_bytes(cfg, world, 0, dp_rank=last).optimizer


# -- activations of one micro-batch ---------------------------------------------------------------------
def _saved_per_chunk(rank: int, world: int, argv: list[str]) -> list[tuple[int, int]]:
    """(virtual stage, distinct saved bytes) of one training forward of each of this rank's chunks, on
    fresh tokens and labels (a random received hidden on later stages)."""
    from megamoe.parallel.mesh import ParallelMesh
    from megamoe.training.run import build_model

    EXPERT_BUFFERS.clear()  # buffers a forked rank inherited are sized for another test's model
    cfg = parse_args(argv)
    mesh = ParallelMesh.from_config(cfg.parallel, world, rank)
    mesh.build_groups()
    model = build_model(cfg, mesh, torch.device("cpu"))
    model.train()
    torch.manual_seed(100 + rank)
    b, s, h = cfg.train.micro_batch_size, cfg.model.seq_length, cfg.model.hidden_size
    local_s = s // mesh.tp if cfg.parallel.sequence_parallel else s
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    out = []
    for c, chunk in enumerate(model.chunks):
        tokens, labels = (torch.randint(0, cfg.model.vocab_size, (b, s)) for _ in range(2))
        hidden = None if chunk.pre_process else torch.randn(b, local_s, h, dtype=dtype, requires_grad=True)
        meter = SavedBytes(list(model.parameters()))
        with meter.hooks():
            result = chunk.stage_forward(tokens, hidden, labels)
        extra = _held_outside_hooks(cfg, hidden) + _chunk_pipeline_bytes(result, meter)
        out.append((c * mesh.pp + mesh.pp_rank, meter.total + extra))
        del result
    return out


def _held_outside_hooks(cfg: Any, hidden: torch.Tensor | None) -> int:
    """A received bf16 hidden is held by the schedule (its fp32 copy is what the first norm saves)."""
    if hidden is None or not cfg.train.bf16 or cfg.train.recompute_granularity == "full":
        return 0
    return hidden.numel() * hidden.element_size()


def _chunk_pipeline_bytes(result: torch.Tensor, meter: SavedBytes) -> int:
    """The K-chunk exchange pipeline keeps each chunk's received rows and expert outputs on its
    autograd node (ctx.received / ctx.outputs), not as saved tensors: their storages, once each."""
    seen, stack, found = set(meter.refs), [result.grad_fn], 0
    visited: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        for t in [*(getattr(node, "received", None) or ()), *(getattr(node, "outputs", None) or ())]:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                found += t.untyped_storage().nbytes()
        stack += [next_node for next_node, _ in node.next_functions]
    return found


@pytest.mark.parametrize("world, extra", [
    (1, []),
    (1, ["--bf16"]),
    (2, [EP, "2"]),
    (2, [TP, "2"]),  # TP-deduplicated exchange
    (2, [TP, "2"] + SP),
    (4, [PP, "2", EP, "2"]),
    (2, [EP, "2", "--moe-capacity-factor", "1.0"]),
    (2, [EP, "2", "--moe-alltoall-chunks", "2"]),  # pipelined chunks: rows held on the autograd node
    (1, ["--recompute-granularity", "full"]),
    (1, ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"]),
    (2, [EP, "2", "--recompute-granularity", "selective"]),
    (1, ["--model-preset", "mixtral-tiny"]),
    (2, ["--model-preset", "mixtral-tiny", TP, "2", "--bf16"] + SP),
], ids=["single", "bf16", "ep2", "tp2-dedup", "tp2-sp", "pp2-ep2", "ep2-capacity", "ep2-k2", "full-recompute",
        "block-recompute", "ep2-selective", "mixtral", "mixtral-tp2-sp-bf16"])
def test_saved_activations_within_10_percent(world, extra):
    argv = TINY_ARGS + extra
    cfg = parse_args(argv)
    measured = [m for rank in run_ranks(world, _saved_per_chunk, argv) for m in rank]
    for v, real in measured:
        predicted = chunk_activation_bytes(cfg, world, v).saved
        assert predicted == pytest.approx(real, rel=0.10), (v, predicted, real)
    if "full" in extra and "block" not in extra:  # only the layers' inputs: far below the plain model
        plain = chunk_activation_bytes(parse_args(TINY_ARGS), 1, 0).saved
        assert all(real < 0.5 * plain for _, real in measured)


# -- 1F1B: the peak over a step -------------------------------------------------------------------------
def _peak_over_step(trainer: Any) -> dict[str, Any]:
    return dict(pp_rank=trainer.mesh.pp_rank, peak=trainer.saved_peak)


def _train_metered(rank: int, world: int, argv: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """train_and_inspect with every train step run under a SavedBytes meter (its peak kept)."""
    from megamoe.training import loop

    original = loop.Trainer.train_step

    def metered(self):
        meter = SavedBytes(list(self.model.parameters()))
        with meter.hooks():
            record = original(self)
        self.saved_peak = meter.peak
        return record

    loop.Trainer.train_step = metered
    EXPERT_BUFFERS.clear()  # as in _saved_per_chunk
    try:
        return train_and_inspect(rank, world, argv, _peak_over_step)
    finally:
        loop.Trainer.train_step = original


@pytest.mark.parametrize("extra, in_flight", [
    ([], (2, 1)),
    (["--recompute-granularity", "full"], (2, 1)),
    # interleaved, 2 chunks per rank: warmup (PP - rank - 1) x 2 + (chunks - 1) x PP forwards, then one more
    (["--num-layers-per-virtual-pipeline-stage", "1"], (5, 3)),
], ids=["plain", "full-recompute", "interleaved"])
def test_one_f_one_b_peak_pp2(extra, in_flight):
    # PP 2 x DP 1, 4 micro-batches: 1F1B keeps min(PP - rank, 4) alive on each rank
    argv = TINY_ARGS + [PP, "2", "--train-iters", "1"] + extra
    cfg = parse_args(argv)
    for seen, records in run_ranks(2, _train_metered, argv):
        predicted = pipeline_peak(cfg, 2, seen["pp_rank"])
        assert predicted.micro_batches == in_flight[seen["pp_rank"]]
        assert records[-1]["pp_max_in_flight"] == predicted.micro_batches
        assert predicted.saved_bytes == pytest.approx(seen["peak"], rel=0.10), (seen, predicted)
