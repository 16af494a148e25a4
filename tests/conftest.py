"""Helpers shared by the test files (one copy each, instead of one per file).

Fixtures (pytest finds them by name): ``single`` and ``single_big``, the single-process reference runs
of openmoe-tiny that layout-invariance tests compare against, computed once per session.

Plain functions and constants, imported with ``from tests.conftest import ...``: the comparisons
(``assert_same_losses``, ``assert_bitwise``, ``assert_one_line_config_error``) and the layout flags.
``tests/harness.py`` keeps what runs training (``run_ranks``, ``train_losses``, ``TINY_ARGS``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from megamoe.arguments import parse_args
from megamoe.config import ConfigError
from tests.harness import TINY_ARGS, train_losses

TP, PP, EP = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
              "--expert-model-parallel-size")
Z = "--use-distributed-optimizer"
BIG = ["--global-batch-size", "16"]  # 16 samples per step: enough for DP 2-8 at micro-batch 2
LOSS_KEYS = ("lm_loss", "aux_loss", "z_loss", "grad_norm")
# The load-balancing loss counts tokens per expert (integers). A token whose k-th and (k+1)-th router
# scores are a near-tie can pick the other expert under another layout's summation order, moving the
# aux loss by ~E * |P_a - P_b| / (tokens * k) of itself: 1.2e-5..3.2e-5 measured on an AVX-512 CPU
# (world-8 layouts, openmoe-tiny), where lm loss, z loss and grad norm stayed within 1e-5.
AUX_FLIP_REL = 1e-4
TINY_ITERS = 10  # --train-iters in TINY_ARGS

Records = Sequence[dict[str, Any]]


# Session scope: the reference runs are deterministic and only read, so every file shares one copy.
# A module may still define its own fixture of the same name (that one wins there).
@pytest.fixture
def torch_ops_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused hidden's PyTorch ops (the fallback), not the C kernels of megamoe/cpu_kernels.py."""
    from megamoe import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "ENABLED", False)


@pytest.fixture(scope="session")
def single() -> list[dict[str, Any]]:
    """openmoe-tiny on one process with TINY_ARGS: the per-iteration records (do not modify)."""
    return train_losses(1)


@pytest.fixture(scope="session")
def single_big() -> list[dict[str, Any]]:
    """As ``single`` with BIG (global batch 16), the reference of the world-8 layouts."""
    return train_losses(1, BIG)


def assert_same_losses(a_recs: Records, b_recs: Records, rel: float = 1e-5, n: int | None = TINY_ITERS,
                       keys: Sequence[str] = LOSS_KEYS) -> None:
    """``b_recs`` trained like ``a_recs``: as many records (``n`` each, unless None), and each of
    ``keys`` equal to relative tolerance ``rel`` at every iteration."""
    assert len(a_recs) == len(b_recs)
    if n is not None:
        assert len(a_recs) == n
    for a, b in zip(a_recs, b_recs):
        for key in keys:
            tolerance = max(rel, AUX_FLIP_REL) if key == "aux_loss" else rel
            assert b[key] == pytest.approx(a[key], rel=tolerance), (a["iteration"], key)


def assert_bitwise(a_recs: Records, b_recs: Records) -> None:
    """The same iterations with exactly the same lm loss and grad norm (an exact resume)."""
    assert [r["iteration"] for r in a_recs] == [r["iteration"] for r in b_recs]

    def values(recs: Records) -> list[tuple[float, float]]:
        return [(r["lm_loss"], r["grad_norm"]) for r in recs]

    assert values(a_recs) == values(b_recs)


def assert_one_line_config_error(argv: Sequence[str], world: int, message: str,
                                 base_args: Sequence[str] = TINY_ARGS) -> None:
    """``base_args + argv`` is rejected for ``world`` ranks before any launch, by a ConfigError whose
    one-line text contains ``message``."""
    with pytest.raises(ConfigError) as err:
        parse_args(list(base_args) + list(argv)).validate(world)
    text = str(err.value)
    assert message in text and "\n" not in text


def train_and_inspect(rank: int, world: int, argv: Sequence[str], inspect: Callable[[Any], dict[str, Any]],
                      ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A ``run_ranks`` function: train on this rank with ``argv`` and return what ``inspect(trainer)``
    reported after the last step (later steps update earlier keys), and this rank's records."""
    from megamoe.training import loop
    from tests.harness import _train_rank

    seen: dict[str, Any] = {}
    original = loop.Trainer.train_step

    def spy(self):
        record = original(self)
        seen.update(inspect(self))
        return record

    loop.Trainer.train_step = spy
    try:
        return seen, _train_rank(rank, world, argv)
    finally:
        loop.Trainer.train_step = original


def poison_expert_grads(monkeypatch: pytest.MonkeyPatch, poisoned: Callable[[int], bool]) -> None:
    """Multiply the n-th expert output-projection gradient (counting every MoE layer's backward, from
    1) by inf wherever ``poisoned(n)``; set before the model is built (and before ranks fork)."""
    from megamoe.moe.experts import GroupedExperts

    original, calls = GroupedExperts.__init__, {"n": 0}

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)

        def hook(grad):
            calls["n"] += 1
            return grad * float("inf") if poisoned(calls["n"]) else grad

        self.wo.register_hook(hook)

    monkeypatch.setattr(GroupedExperts, "__init__", init)


def fp8_experts(recipe: str | None, hidden: int = 128, ffn: int = 128, experts: int = 3, grouped: bool = True,
                pad: int = 0, backend: str = "torch", device: str = "cpu") -> Any:
    """GroupedExperts with N(0, 0.05) weights (seed 0), in hybrid FP8 under ``recipe`` (None: fp32)."""
    import torch

    from megamoe.moe.experts import GroupedExperts
    from megamoe.moe.fp8 import FP8Recipe

    torch.manual_seed(0)
    fp8 = None if recipe is None else FP8Recipe(format="hybrid", recipe=recipe, amax_history_len=8,
                                                pad_rows_to=pad, backend=backend)
    module = GroupedExperts(hidden, ffn, list(range(experts)), 0.05, 0.05, grouped=grouped, fp8=fp8)
    module = module.to(device)
    with torch.no_grad():
        for p in (module.wi_gate, module.wi_up, module.wo):
            p.normal_(0, 0.05)
    return module


def run_experts(module: Any, x: Any, counts: Any) -> tuple[Any, Any, list[Any]]:
    """Forward and backward (a fixed ramp as the output gradient): (y, dx, [d wi_gate, d wi_up, d wo])."""
    import torch

    x = x.clone().requires_grad_(True)
    y = module(x, counts)
    y.backward(torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y))
    return y.detach(), x.grad, [p.grad.clone() for p in (module.wi_gate, module.wi_up, module.wo)]
