"""Host synchronisations of one MoE layer forward (issue 20 item 5).

A GPU host sync (the CPU waits for the device queue to drain) happens when a value computed on the
device is needed on the host: tensor -> Python conversions (``item``, ``float()``, ``int()``,
``bool()``, ``tolist``), operations whose OUTPUT SHAPE depends on the data (``nonzero``, boolean-mask
indexing, ``repeat_interleave`` with tensor repeats and no ``output_size``, ``unique``,
``bincount`` -- its CUDA kernel reads min and max back), and blocking host-to-device copies of
Python data (``torch.tensor([...])`` moved to the GPU).

On CPU nothing really syncs, so :class:`SyncCounter` flags the operations that WOULD sync on a GPU
(a TorchDispatchMode sees every aten op; ``tolist`` bypasses the dispatcher and is wrapped) and
names each by the megamoe function that issued it. With CUDA, the ``gpu`` test counts real syncs with
``torch.cuda.set_sync_debug_mode``.

Counts per MoE layer forward (router top-2, 8 experts, 24 tokens, a warm-up forward first).
"ops" = syncing operations the detector found on the code before this change, less the two min/max
reads F.one_hot does only on CPU (on CUDA it relies on device asserts); "GPU syncs" counts bincount as
the two read-backs its CUDA kernel does (min, then max):

    layout                                before: ops   GPU syncs    after
    single process, capacity 1.0 / dropless       8         10          1
    EP 2, 1 chunk                                10         12          1
    EP 2, 2 chunks (pipelined)                   16         19          1

Before, per layer forward: bincount in the router; per chunk in permute: three boolean-mask gathers,
the placement's order key built on the host and copied over, bincount; the ``tolist`` of the
all-to-all block sizes; ``repeat_interleave`` with tensor repeats (per chunk when pipelined);
``float(aux)`` and ``float(z)`` in MoEStats.record. Per micro-batch ``float(loss)``; per step three
``.cpu()`` in the grad norm and two reads per MoE layer for the load imbalance.

After: the one device-to-host copy of every chunk's per-expert counts of every EP rank
(``dispatcher._host_counts``): the host must know the all-to-all split sizes, and the row counts
(kept assignments per expert) size everything after the routing. The sort that replaces the masks,
the counts (scatter_add), the expert grouping (repeat_interleave with ``output_size``) and the
per-expert GEMM loop's sizes all come from it or need no host value. Per step: one read of the LM
losses, one of the MoE statistics (aux, z, load imbalance), one copy of the grad norm's partial sums.
"""

from __future__ import annotations

import traceback
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megamoe.arguments import parse_args
from megamoe.config import MoEConfig
from megamoe.model.init import init_model_weights
from megamoe.moe.exchange import EPTopology
from megamoe.moe.layer import MoELayer, MoEParallel, MoEStats
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.optimizer import build_optimizer
from megamoe.parallel.schedules import StepContext, no_pipeline
from megamoe.training.run import build_model
from tests.harness import TINY_ARGS, run_ranks

H, FFN, E, K, TOKENS = 16, 24, 8, 2, 24  # TOKENS = batch 2 x sequence 12
# Data-dependent output shape (or a read-back inside the CUDA kernel): syncs on a GPU.
_SHAPE_SYNCING = {"nonzero", "masked_select", "bincount", "unique_dim", "unique_consecutive",
                  "_unique", "_unique2", "argwhere"}

# The only host sync one MoE layer forward may do: one copy of every chunk's per-expert counts.
ALLOWED = [("tolist", "dispatcher.py:_host_counts")]


def _where() -> str:
    """The innermost megamoe frame of the current Python stack, as 'file.py:function'."""
    for frame in reversed(traceback.extract_stack()):
        if "/megamoe/" in frame.filename:
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.name}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """Records (operation, where) for every operation that would make the host wait on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self._tolist = torch.Tensor.tolist

    def _record(self, what: str) -> None:
        self.events.append((what, _where()))

    def __enter__(self) -> SyncCounter:
        counter, tolist = self, self._tolist

        def counted_tolist(t: torch.Tensor):  # bypasses the dispatcher: wrap it
            counter._record("tolist")
            return tolist(t)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.tolist = self._tolist
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":  # item(), float(), int(), bool() of a tensor
            self._record("item")
        elif name in _SHAPE_SYNCING:
            self._record(name)
        elif name == "repeat_interleave" and isinstance(args[0], torch.Tensor) \
                and kwargs.get("output_size", args[2] if len(args) > 2 else None) is None:
            self._record("repeat_interleave without output_size")
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in (args[1] or ())):
            self._record("boolean mask index")
        elif name == "lift_fresh":  # torch.tensor(python data): a blocking copy onto a GPU
            self._record("host data -> tensor")
        return func(*args, **kwargs)


def _layer(par: MoEParallel | None = None, device: str = "cpu", capacity: float | None = 1.0,
           grouped: bool = True) -> MoELayer:
    cfg = MoEConfig(num_experts=E, router_topk=K, capacity_factor=capacity, min_capacity=1,
                    grouped_gemm=grouped)
    layer = MoELayer(1, H, FFN, cfg, std=0.1, out_std=0.1, stats=MoEStats(), par=par)
    init_model_weights(layer, seed=5)
    return layer.to(device).train()


def _count_forward(layer: MoELayer, seed: int) -> list[tuple[str, str]]:
    """Syncs of one training forward (after a warm-up forward that fills per-device caches)."""
    x = torch.randn(2, TOKENS // 2, H, generator=torch.Generator().manual_seed(seed))
    layer(x)
    with SyncCounter() as counter:
        layer(x)
    return counter.events


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-gemm", "gemm-loop"])
@pytest.mark.parametrize("capacity", [1.0, None], ids=["capacity", "dropless"])
def test_single_process_one_sync_per_layer_forward(capacity, grouped):
    assert _count_forward(_layer(capacity=capacity, grouped=grouped), seed=0) == ALLOWED


def _ep_counts(rank: int, world: int, chunks: int) -> list[tuple[str, str]]:
    mesh = ParallelMesh(world_size=world, rank=rank, ep=world)
    mesh.build_groups()
    par = MoEParallel(ep=EPTopology.from_mesh(mesh, hierarchical=False), chunks=chunks)
    return _count_forward(_layer(par), seed=rank)


@pytest.mark.parametrize("chunks", [1, 2])
def test_expert_parallel_one_sync_per_layer_forward_for_all_chunks(chunks):
    for events in run_ranks(2, _ep_counts, chunks):
        assert events == ALLOWED


def test_training_step_reads_losses_statistics_and_norm_once():
    """A whole step of openmoe-tiny (2 MoE layers, 3 micro-batches): forward and backward do only the
    MoE layers' counts copies; the LM losses, the MoE statistics and the gradient norm are each read
    once, after the schedule."""
    cfg = parse_args(TINY_ARGS)
    mesh = ParallelMesh.from_config(cfg.parallel, 1, 0)
    mesh.build_groups()
    model = build_model(cfg, mesh, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg, mesh)
    num_moe = sum(isinstance(m, MoELayer) for m in model.modules())
    batches = [(tokens, tokens) for tokens in torch.randint(0, 1000, (3, 2, 32))]

    def schedule() -> StepContext:
        model.moe_stats.reset(grad_scale=1 / len(batches))
        ctx = StepContext(chunks=list(model.chunks), batches=batches, loss_scale=1 / len(batches))
        optimizer.start_step(len(batches))
        ctx.start_schedule()
        no_pipeline(ctx)
        ctx.end_schedule()
        optimizer.finish_grad_sync()
        return ctx

    schedule()
    optimizer.zero_grad()
    with SyncCounter() as counter:
        ctx = schedule()
    assert num_moe == 2 and counter.events == ALLOWED * (num_moe * len(batches))
    with SyncCounter() as counter:
        losses = ctx.losses
        model.moe_stats.step_values()
    assert len(losses) == 3 and [what for what, _ in counter.events] == ["tolist", "tolist"]
    copies = []
    cpu = torch.Tensor.cpu

    def counted_cpu(t, *args, **kwargs):
        copies.append(t.shape)
        return cpu(t, *args, **kwargs)

    torch.Tensor.cpu = counted_cpu
    try:
        assert optimizer.grad_norm() > 0
    finally:
        torch.Tensor.cpu = cpu
    assert copies == [torch.Size([])]  # this rank's fp64 sum of squares, then one all-reduce


def test_counter_sees_the_syncing_operations():
    """The detector itself: each of these would block the host on a GPU."""
    x = torch.arange(6)
    with SyncCounter() as counter:
        x.tolist()
        float(x[0])
        x[x > 2]
        torch.bincount(x)
        x.repeat_interleave(x)
        torch.tensor([1, 2])
        x.repeat_interleave(x, output_size=15)  # size given: no sync
        torch.argsort(x, stable=True)  # no sync
    assert [what for what, _ in counter.events] == [
        "tolist", "item", "boolean mask index", "bincount", "repeat_interleave without output_size",
        "host data -> tensor"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_syncs_once():
    """Real syncs on a GPU: cudaStreamSynchronize / blocking copies reported by the sync debug mode."""
    layer = _layer(device="cuda")
    x = torch.randn(2, TOKENS // 2, H, device="cuda")
    layer(x)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            layer(x)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
