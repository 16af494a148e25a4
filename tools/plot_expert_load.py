#!/usr/bin/env python3
"""Draw the MoE expert load and EP-rank imbalance recorded in a --metrics-file.

    python tools/plot_expert_load.py METRICS.jsonl -o load.png [--layers 1,3] [--title TEXT]

Reads the records that carry "moe_expert_load" (written every --log-interval iterations: per MoE layer
the tokens each logical expert got over the interval, the layers' global indices in
"moe_expert_load_layers", and the EP rank of each expert in "moe_expert_rank") and the rebalance
records ("moe_experts_moved", ...). Draws one PNG: per MoE layer a heatmap of each expert's share of
that layer's tokens over iterations, and below it per layer max/mean EP-rank load (rank load = sum of
the loads of the experts the rank holds) with dashed lines at rebalances. Prints a short summary.
Exit 2 with one 'plot_expert_load: error: ...' line on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PROG = "plot_expert_load"
NO_LOAD_HINT = ("run training with --log-interval and a MoE model; the key is written at log intervals "
                "into --metrics-file")


class ToolError(Exception):
    """Bad input: reported as one line, exit 2."""


@dataclass
class LoadRecord:
    iteration: int
    layers: list[int]
    loads: list[list[float]]  # per layer, per logical expert
    ranks: list[list[int]] | None  # per layer, EP rank of each logical expert; None if not logged


@dataclass
class Rebalance:
    iteration: int
    moved: int | None
    bytes: int | None
    seconds: float | None
    before: list[float] | None  # per layer, max/mean EP-rank load
    after: list[float] | None


@dataclass
class Metrics:
    loads: list[LoadRecord]
    rebalances: list[Rebalance]
    skipped_lines: int = 0
    experts: dict[int, int] = field(default_factory=dict)  # global layer -> number of experts


def _num_list(v: Any, what: str, where: str, integer: bool = False) -> list:
    ok = int if integer else (int, float)
    if not isinstance(v, list) or not all(isinstance(x, ok) and not isinstance(x, bool) for x in v):
        raise ToolError(f"{where}: {what} is not a list of {'integers' if integer else 'numbers'}")
    return v


def _per_layer(rec: dict, key: str, where: str, integer: bool = False) -> list[list]:
    v = rec[key]
    if not isinstance(v, list):
        raise ToolError(f"{where}: {key} is not a list with one entry per MoE layer")
    return [_num_list(x, f"{key}[{i}]", where, integer) for i, x in enumerate(v)]


def _opt(rec: dict, key: str, kind: type) -> Any:
    v = rec.get(key)
    return kind(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def read_metrics(path: str) -> Metrics:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ToolError(f"cannot read metrics file {path}: {e.strerror or e}") from None
    # Keyed by iteration, later lines win: the metrics file is opened for append, so a run resumed from
    # an earlier checkpoint logs the replayed iterations again, and the resumed run is the one that went on.
    loads: dict[int, LoadRecord] = {}
    rebalances: dict[int, Rebalance] = {}
    skipped = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a partial line: at the end, or in the middle once a resumed
            # run appends after it. Neither says anything about the records around it.
            skipped += 1
            continue
        if not isinstance(rec, dict) or ("moe_expert_load" not in rec and "moe_experts_moved" not in rec):
            continue  # ordinary iterations, eval lines
        where = f"{path} line {lineno}"
        it = rec.get("iteration")
        if not isinstance(it, int) or isinstance(it, bool):
            raise ToolError(f"{where}: MoE load record without an integer \"iteration\"")
        if "moe_expert_load" in rec:
            load = _per_layer(rec, "moe_expert_load", where)
            layers = (_num_list(rec["moe_expert_load_layers"], "moe_expert_load_layers", where, True)
                      if "moe_expert_load_layers" in rec else list(range(len(load))))
            if len(layers) != len(load):
                raise ToolError(f"{where}: moe_expert_load has {len(load)} layers but "
                                f"moe_expert_load_layers names {len(layers)}")
            ranks = _per_layer(rec, "moe_expert_rank", where, True) if "moe_expert_rank" in rec else None
            if ranks is not None:
                if len(ranks) != len(load):
                    raise ToolError(f"{where}: moe_expert_rank has {len(ranks)} layers but "
                                    f"moe_expert_load has {len(load)}")
                for layer, r, x in zip(layers, ranks, load):
                    if len(r) != len(x):
                        raise ToolError(f"{where}: inconsistent expert counts: layer {layer} has {len(x)} "
                                        f"loads but {len(r)} entries in moe_expert_rank")
                    if any(v < 0 for v in r):
                        raise ToolError(f"{where}: layer {layer}: negative EP rank in moe_expert_rank")
            if any(not x for x in load):
                raise ToolError(f"{where}: inconsistent expert counts: a moe_expert_load layer has no expert")
            loads[it] = LoadRecord(it, list(layers), load, ranks)
        if "moe_experts_moved" in rec:
            before = _per_layer_ratio(rec, "moe_rank_load_before")
            after = _per_layer_ratio(rec, "moe_rank_load_after")
            rebalances[it] = Rebalance(it, _opt(rec, "moe_experts_moved", int),
                                       _opt(rec, "moe_rebalance_bytes", int),
                                       _opt(rec, "moe_rebalance_seconds", float), before, after)
    if not loads:
        raise ToolError(f"{path}: no line has \"moe_expert_load\"; {NO_LOAD_HINT}")
    m = Metrics([loads[i] for i in sorted(loads)], [rebalances[i] for i in sorted(rebalances)], skipped)
    # The heatmap stacks one layer's records into an (experts x iterations) array, so a layer must keep
    # its expert count; a file appended to by runs with different --num-experts cannot be drawn as one.
    for r in m.loads:
        for layer, x in zip(r.layers, r.loads):
            n = m.experts.setdefault(layer, len(x))
            if n != len(x):
                raise ToolError(f"{path}: inconsistent expert counts: layer {layer} has {n} experts before "
                                f"iteration {r.iteration} and {len(x)} there; plot one run's metrics file")
    return m


def _per_layer_ratio(rec: dict, key: str) -> list[float] | None:
    """Only printed, never drawn: a shape other than one number per layer is left out, not an error."""
    v = rec.get(key)
    if not isinstance(v, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
        return None
    return [float(x) for x in v]


def imbalance(loads: list[float], ranks: list[int] | None, ep: int) -> float:
    """max over EP ranks / mean of the rank load; NaN where no rank map was logged or no token routed."""
    if ranks is None:
        return math.nan
    rank_load = np.bincount(np.asarray(ranks), weights=np.asarray(loads, dtype=np.float64), minlength=ep)
    mean = rank_load.sum() / ep
    return float(rank_load.max() / mean) if mean > 0 else math.nan


def ep_size(r: LoadRecord) -> int | None:
    """EP ranks in one record: every rank holds E/EP experts, so the highest rank named is EP - 1. Taken
    over all layers of the record (they share the EP group) and per record (a resumed run may use another
    EP size)."""
    if r.ranks is None or not any(r.ranks):
        return None
    return max(max(x) for x in r.ranks if x) + 1


@dataclass
class LayerSeries:
    layer: int
    iterations: list[int]
    share: np.ndarray  # experts x records, each column sums to 1 (NaN where the layer got no token)
    imbalance: list[float]


def series(m: Metrics, layers: list[int]) -> list[LayerSeries]:
    out = []
    for layer in layers:
        its, cols, imb = [], [], []
        for r in m.loads:
            if layer not in r.layers:
                continue
            i = r.layers.index(layer)
            x = np.asarray(r.loads[i], dtype=np.float64)
            total = x.sum()
            cols.append(x / total if total > 0 else np.full_like(x, np.nan))
            ep = ep_size(r)
            imb.append(imbalance(r.loads[i], r.ranks[i] if r.ranks else None, ep) if ep else math.nan)
            its.append(r.iteration)
        out.append(LayerSeries(layer, its, np.stack(cols, axis=1), imb))
    return out


def parse_layers(spec: str | None, available: list[int], path: str) -> list[int]:
    if spec is None:
        return available
    try:
        wanted = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ToolError(f"--layers {spec}: expected comma-separated global layer indices, e.g. 1,3") from None
    if not wanted:
        raise ToolError(f"--layers {spec!r}: expected comma-separated global layer indices, e.g. 1,3")
    missing = [w for w in wanted if w not in available]
    if missing:
        raise ToolError(f"--layers {spec}: {path} has no MoE layer {', '.join(map(str, missing))} "
                        f"(it has layers {', '.join(map(str, available))})")
    return sorted(set(wanted))


def _edges(its: list[int]) -> np.ndarray:
    """Cell edges half-way between logged iterations, so uneven intervals (a resume) keep true x."""
    x = np.asarray(its, dtype=np.float64)
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def draw(data: list[LayerSeries], rebalance_its: list[int], title: str | None, output: str) -> None:
    # Figure + the Agg canvas directly rather than pyplot: no display needed, no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heights = [max(1.4, min(4.0, 0.12 * s.share.shape[0])) for s in data] + [2.8]
    fig = Figure(figsize=(10, sum(heights) + 0.9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(heights), 1, sharex=True, gridspec_kw={"height_ratios": heights})
    vmax = max(float(np.nanmax(s.share)) if np.isfinite(s.share).any() else 0.0 for s in data) or 1.0
    for ax, s in zip(axes, data):
        e = s.share.shape[0]
        mesh = ax.pcolormesh(_edges(s.iterations), np.arange(e + 1) - 0.5, s.share, cmap="viridis",
                             vmin=0.0, vmax=vmax, shading="flat")
        ax.set_ylabel(f"layer {s.layer}\nexpert")
        ax.set_ylim(-0.5, e - 0.5)
        cb = fig.colorbar(mesh, ax=ax, pad=0.01)
        cb.set_label("token share", fontsize=8)
        for it in rebalance_its:
            ax.axvline(it, color="white", linestyle="--", linewidth=0.8)
    ax = axes[-1]
    for s in data:
        ax.plot(s.iterations, s.imbalance, marker=".", label=f"layer {s.layer}")
    ax.axhline(1.0, color="grey", linewidth=0.6)
    for k, it in enumerate(rebalance_its):
        ax.axvline(it, color="black", linestyle="--", linewidth=0.8, label="rebalance" if k == 0 else None)
    ax.set_ylabel("EP-rank load\nmax / mean")
    ax.set_xlabel("iteration")
    ax.legend(fontsize=7, ncol=min(6, len(data) + 1), loc="upper right")
    if title:
        fig.suptitle(title)
    out_dir = os.path.dirname(os.path.abspath(output))
    # Written aside and renamed, so a failed draw never leaves a half PNG where an old one was.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, output)
    except BaseException:
        os.unlink(tmp)
        raise


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def summary(path: str, m: Metrics, data: list[LayerSeries], all_layers: list[int]) -> list[str]:
    its = [r.iteration for r in m.loads]
    eps = sorted({e for e in map(ep_size, m.loads) if e})
    experts = sorted({m.experts[s.layer] for s in data})
    ep = "/".join(map(str, eps)) or "n/a (no moe_expert_rank)"
    out = [f"metrics        {path}",
           f"iterations     {its[0]}..{its[-1]} ({len(its)} load records)"
           + (f", {m.skipped_lines} unreadable line(s) skipped" if m.skipped_lines else ""),
           f"layers         {len(data)} MoE layer(s) [{', '.join(str(s.layer) for s in data)}], "
           f"{'/'.join(map(str, experts))} experts, EP {ep}",
           f"rebalances     {len(m.rebalances)}"]
    for rb in m.rebalances:
        mib = None if rb.bytes is None else rb.bytes / 2**20
        line = (f"  iteration {rb.iteration}: {rb.moved if rb.moved is not None else '?'} experts moved, "
                f"{_fmt(mib, '.2f')} MiB, {_fmt(rb.seconds, '.3f')} s")
        # before/after are per MoE layer in the order the load records list all layers.
        if rb.before and rb.after and len(rb.before) == len(rb.after) == len(all_layers):
            line += "; max/mean " + ", ".join(
                f"layer {all_layers[i]} {rb.before[i]:.3f}->{rb.after[i]:.3f}"
                for i in range(len(all_layers)) if all_layers[i] in {s.layer for s in data})
        out.append(line)
    for s in data:
        out.append(f"layer {s.layer:<8} imbalance first {_fmt(s.imbalance[0])} "
                   f"(iteration {s.iterations[0]}), "
                   f"last {_fmt(s.imbalance[-1])} (iteration {s.iterations[-1]})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("metrics", help="a --metrics-file JSONL")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    p.add_argument("--layers", help="comma-separated global MoE layer indices to draw (default: all)")
    p.add_argument("--title", help="figure title")
    args = p.parse_args(argv)
    try:
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):
            raise ToolError(f"-o {args.output}: directory {out_dir} does not exist")
        if os.path.isdir(args.output):
            raise ToolError(f"-o {args.output} is a directory; name the PNG file to write")
        m = read_metrics(args.metrics)
        all_layers = sorted(m.experts)
        layers = parse_layers(args.layers, all_layers, args.metrics)
        data = series(m, layers)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ToolError("matplotlib is not installed; pip install -r requirements.txt") from None
        try:
            draw(data, [rb.iteration for rb in m.rebalances], args.title, args.output)
        except OSError as e:
            raise ToolError(f"cannot write {args.output}: {e.strerror or e}") from None
    except ToolError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(summary(args.metrics, m, data, all_layers)))
    print(f"wrote          {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
