"""FP8 expert GEMMs in torch float8 (docs/ARCHITECTURE.md, "FP8 experts").

Every expert projection y = x @ w (x: [N, K] rows grouped by expert, w: [G, K, M]) quantises its
operands to FP8 and multiplies them with fp32 accumulation, forward (x, w), input gradient (dy, w) and
weight gradient (x, dy). Scales are powers of two, so dequantising (q / scale) is exact: an fp32 GEMM of
the dequantised operands is bit for bit what an FP8 kernel with fp32 accumulation computes, up to the
order of the sums. That is how the GEMM runs off-GPU (CPU here); Transformer Engine runs it on GPUs.

Formats: ``e4m3`` (max 448) for everything, or ``hybrid``: E4M3 for x and w, E5M2 (max 57344) for dy.
Values beyond the format's range saturate to its max (no inf).

Recipes, and why each keeps the layout-invariance contract or does not:
  delayed     one scale per (logical expert, projection, operand) from the amax history of EARLIER
              steps (max or most recent, then 2^-margin). The step's amaxes are a max over every row
              the expert saw in the step, reduced over the expert-data-parallel replicas once per
              step (:func:`finish_fp8_step`): a max does not depend on how rows were split into
              micro-batches or ranks, so every layout uses the same scales. An operand with no
              history yet (the first step, an expert that never got a token) runs unquantised.
  tensorwise  current scaling: one scale per expert and operand from the amax of THIS GEMM's rows.
              Which rows share a GEMM depends on the layout (EP gathers several micro-batches), so
              tensorwise runs are not layout invariant (as in Megatron and TE); use it for speed only.
  blockwise   current scaling per 1 x 128 tile of every row of x and dy (along their feature dim)
              and per 128 x 128 block of w (DeepSeek-V3, TE's Float8BlockScaling): a tile never spans
              two rows, so scales do not depend on the layout. The weight gradient uses the same
              row tiles (TE's GPU kernels use 128 x 1 tiles there; this emulation keeps invariance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
INPUT, WEIGHT, GRAD = 0, 1, 2  # operand index in the [..., 3] scale and amax tables
BLOCK = 128


@dataclass(frozen=True)
class FP8Recipe:
    """What the flags ask for (MoEConfig.fp8_*)."""

    format: str = "e4m3"  # "e4m3" | "hybrid"
    recipe: str = "delayed"  # "delayed" | "tensorwise" | "blockwise"
    margin: int = 0
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"  # "max" | "most_recent"
    pad_rows_to: int = 0  # 16 with --moe-router-padding-for-fp8
    backend: str = "torch"  # "te": Transformer Engine (megamoe/moe/fp8_te.py), GPU only

    @staticmethod
    def from_config(moe: object) -> FP8Recipe | None:
        fmt = getattr(moe, "fp8_format", None)
        if fmt is None:
            return None
        return FP8Recipe(format=fmt, recipe=moe.fp8_recipe, margin=moe.fp8_margin,
                         amax_history_len=moe.fp8_amax_history_len,
                         amax_compute_algo=moe.fp8_amax_compute_algo,
                         pad_rows_to=16 if moe.router_padding_for_fp8 else 0,
                         backend=moe.fp8_backend or ("te" if te_available() else "torch"))

    @property
    def keeps_history(self) -> bool:
        """Whether this recipe keeps an amax history per logical expert (torch delayed scaling)."""
        return self.recipe == "delayed" and self.backend == "torch"

    def dtype(self, operand: int) -> torch.dtype:
        return E5M2 if self.format == "hybrid" and operand == GRAD else E4M3

    def fp8_max(self) -> torch.Tensor:
        """[3] the largest value of each operand's format."""
        return torch.tensor([FP8_MAX[self.dtype(op)] for op in (INPUT, WEIGHT, GRAD)])


def te_available() -> bool:
    """Transformer Engine imports and a CUDA device exists (the te backend's condition)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything at import
        return False
    return True


# -- quantisation ---------------------------------------------------------------------------------

def pow2_scale(amax: torch.Tensor, fp8_max: float | torch.Tensor, margin: int = 0) -> torch.Tensor:
    """The largest power of two s with amax * s <= fp8_max, divided by 2^margin; 0 where amax is 0 or
    not finite (nothing to scale by: the operand is left unquantised)."""
    ok = (amax > 0) & torch.isfinite(amax)
    exponent = torch.floor(torch.log2(fp8_max / torch.where(ok, amax, torch.ones_like(amax)))) - margin
    return torch.where(ok, torch.exp2(exponent.clamp(-126, 126)), torch.zeros_like(amax))


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded through ``dtype`` at ``scale`` (broadcast to x), returned dequantised in fp32:
    saturating at the format's max; where scale is 0, x unchanged."""
    m = FP8_MAX[dtype]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (x.float() * safe).clamp(-m, m).to(dtype).float() / safe  # / 2^k: exact
    return torch.where(scale > 0, q, x.float())


@dataclass
class Quantized:
    """An operand as FP8 bytes and their scales (``data`` [*blocked shape] float8, ``scale``
    broadcastable to it), or, when some part of it stays unquantised (a scale of 0), as the
    dequantised fp32 values with ``scale`` None. What FP8GroupMM keeps for backward: a quarter of
    fp32 in the first case."""

    data: torch.Tensor
    scale: torch.Tensor | None
    shape: torch.Size

    def dequantize(self) -> torch.Tensor:
        """The fp32 values (exact: the scales are powers of two)."""
        if self.scale is None:
            return self.data.reshape(self.shape)
        return (self.data.float() / self.scale).reshape(self.shape)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, shape: torch.Size | None = None,
                 ) -> Quantized:
    """x rounded to ``dtype`` at ``scale`` (broadcast to x), kept as FP8 bytes; ``shape``: the
    operand's shape when x is a blocked view of it. One host read (whether every scale is set)."""
    shape = x.shape if shape is None else shape
    if bool((scale > 0).all()):
        m = FP8_MAX[dtype]
        return Quantized((x.float() * scale).clamp(-m, m).to(dtype), scale, shape)
    return Quantized(quantize(x, scale, dtype), None, shape)


def group_amax(x: torch.Tensor, group_of_row: torch.Tensor, num_groups: int) -> torch.Tensor:
    """x: [N, K], group_of_row: [N] -> [G] max |x| over each group's rows (0 for an empty group)."""
    row_amax = x.detach().abs().amax(dim=1) if x.shape[0] else x.new_zeros(0)
    out = torch.zeros(num_groups, dtype=torch.float32, device=x.device)
    return out.scatter_reduce(0, group_of_row, row_amax.float(), reduce="amax")


def quantize_row_tiles(x: torch.Tensor, dtype: torch.dtype, block: int = BLOCK, unit: float = 1.0,
                       ) -> Quantized:
    """x: [N, K] with one scale per 1 x block tile of each row (current amax of x / unit: the scale
    is chosen for x / unit and applied to x)."""
    n, k = x.shape
    tiles = x.float().reshape(n, k // block, block)
    scale = pow2_scale(tiles.abs().amax(-1, keepdim=True) / unit, FP8_MAX[dtype])  # [N, K/block, 1]
    return quantize_fp8(tiles, scale / unit, dtype, x.shape)


def quantize_weight_blocks(w: torch.Tensor, dtype: torch.dtype, block: int = BLOCK) -> Quantized:
    """w: [G, K, M] with one scale per block x block square of each expert."""
    g, k, m = w.shape
    blocks = w.float().reshape(g, k // block, block, m // block, block)
    scale = pow2_scale(blocks.abs().amax(dim=(2, 4), keepdim=True), FP8_MAX[dtype])
    return quantize_fp8(blocks, scale, dtype, w.shape)


# -- one projection -------------------------------------------------------------------------------

@dataclass
class ProjectionFP8:
    """How one expert projection quantises in one call: the rows' groups and, for delayed scaling,
    this projection's scales [G, 3] and the step's amax accumulator [G, 3] (updated in place)."""

    recipe: FP8Recipe
    group_of_row: torch.Tensor  # [N] local expert of each row
    num_groups: int
    scales: torch.Tensor | None = None  # delayed: [G, 3] per operand
    step_amax: torch.Tensor | None = None  # delayed, training: [G, 3] max |operand| this step
    # dy here is (gradient of the global mean loss) x grad_divisor: the micro-batch loss scale is 1 /
    # (this rank's micro-batches) and the expert-DP reduction divides by the divisor afterwards
    # (megamoe.parallel.optimizer.expert_grad_divisor). Gradients are scaled and measured as
    # dy / grad_divisor, the same values in every layout, so their FP8 rounding is too.
    grad_divisor: float = 1.0

    def _record(self, operand: int, amax: torch.Tensor) -> None:
        if self.step_amax is not None:
            torch.maximum(self.step_amax[:, operand], amax, out=self.step_amax[:, operand])

    def _group_scale(self, operand: int, amax: torch.Tensor) -> torch.Tensor:
        """[G] scale per expert of ``operand`` whose amax this call is [G]: the history's (delayed:
        the amax is recorded for the step) or this amax's own (tensorwise)."""
        if self.recipe.recipe == "delayed":
            self._record(operand, amax)
            return self.scales[:, operand]
        return pow2_scale(amax, FP8_MAX[self.recipe.dtype(operand)], self.recipe.margin)

    def rows(self, x: torch.Tensor, operand: int) -> Quantized:
        """x or dy: [N, K] quantised."""
        dtype = self.recipe.dtype(operand)
        unit = self.grad_divisor if operand == GRAD else 1.0  # x / unit: the layout-free values
        if self.recipe.recipe == "blockwise":
            return quantize_row_tiles(x, dtype, unit=unit)
        scale = self._group_scale(operand, group_amax(x, self.group_of_row, self.num_groups) / unit)
        return quantize_fp8(x, (scale / unit)[self.group_of_row].unsqueeze(1), dtype)

    def weight(self, w: torch.Tensor) -> Quantized:
        """w: [G, K, M] quantised."""
        dtype = self.recipe.dtype(WEIGHT)
        if self.recipe.recipe == "blockwise":
            return quantize_weight_blocks(w, dtype)
        scale = self._group_scale(WEIGHT, w.detach().abs().amax(dim=(1, 2)).float())
        return quantize_fp8(w, scale[:, None, None], dtype)


class FP8GroupMM(torch.autograd.Function):
    """forward: y = Q(x) @ Q(w) per group; backward: dx = Q(dy) @ Q(w)^T, dw = Q(x)^T Q(dy) per group.

    ``gemm``: the raw per-group kernels of the row layout (megamoe.moe.experts.GroupGemm). Backward
    keeps Q(x) and Q(w) as FP8 bytes and scales (:class:`Quantized`), dequantised when used."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, gemm: object, fp8: ProjectionFP8) -> torch.Tensor:
        xq, wq = fp8.rows(x, INPUT), fp8.weight(w)
        ctx.quantized = (xq, wq)  # not tensors autograd could check: nothing modifies them in place
        ctx.gemm, ctx.fp8, ctx.dtypes = gemm, fp8, (x.dtype, w.dtype)
        return gemm.mm(xq.dequantize(), wq.dequantize()).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        xq, wq = ctx.quantized
        dyq = ctx.fp8.rows(dy.contiguous(), GRAD).dequantize()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = ctx.gemm.mm(dyq, wq.dequantize().transpose(1, 2)).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            dw = ctx.gemm.wgrad(xq.dequantize(), dyq).to(ctx.dtypes[1])
        ctx.quantized = None
        return dx, dw, None, None


# -- delayed scaling state ------------------------------------------------------------------------

def scales_from_history(history: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
    """history: [..., 3, L] amaxes (newest first) -> [..., 3] scales (0: no history, unquantised)."""
    amax = history.amax(-1) if recipe.amax_compute_algo == "max" else history[..., 0]
    return pow2_scale(amax, recipe.fp8_max().to(history.device), recipe.margin)


def push_history(history: torch.Tensor, amax: torch.Tensor) -> None:
    """history: [..., L] <- amax [...] as the newest entry, the oldest dropped (in place)."""
    history.copy_(torch.roll(history, 1, dims=-1))
    history[..., 0] = amax


def finish_fp8_step(experts: list, group: dist.ProcessGroup | None, update: bool = True) -> None:
    """Once per step, on every rank of a stage: the step's amaxes, reduced (max) over the
    expert-data-parallel replicas, become the newest history entry of every delayed-scaling expert
    module (``experts``: GroupedExperts with ``fp8_amax_history``); ``update`` False (a skipped step,
    non-finite gradients) drops them instead. One all-reduce for all modules."""
    if not experts:
        return
    amax = torch.cat([e.fp8_step_amax.reshape(-1) for e in experts])
    if update and group is not None:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    offset = 0
    for e in experts:
        n = e.fp8_step_amax.numel()
        if update:
            push_history(e.fp8_amax_history.data, amax[offset:offset + n].view_as(e.fp8_step_amax))
        e.fp8_step_amax.zero_()
        e.fp8_scales = None  # recomputed from the new history at the next forward
        offset += n
