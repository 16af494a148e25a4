"""Layout-independent, atomic checkpoints (safetensors + JSON: no pickle is ever loaded).

Every tensor is stored by its GLOBAL identity: the logical parameter (``layers.5.mlp.experts.3.wo``
for logical expert 3, whichever rank held it), the full logical shape, and the region this piece
covers. Each rank writes the pieces it is the designated writer of (one copy per replica group) in
parallel; a load under any other layout (TP / PP / EP / DP / ZeRO on or off / another expert placement)
reads, for each of its parameters, the overlapping regions from whichever files hold them.

    DIR/iter_0000100/rank_00003.safetensors   weight / master / exp_avg / exp_avg_sq pieces
    DIR/iter_0000100/meta.json                iteration, consumed samples, AdamW step, layout, config,
                                              expert placement
    DIR/latest                                "iter_0000100", replaced last (atomic rename)

A save is written to ``iter_XXXXXXX.tmp`` and renamed only when every rank has finished, then
``latest`` is replaced, so a crash mid-save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from megamoe.config import Config
from megamoe.moe.dispatcher import ExpertPlacement
from megamoe.parallel.comm import merge_dicts
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.optimizer import DistributedOptimizer, StateShard
from megamoe.params import is_expert, is_tp_split, role
from megamoe.training.safetensors_stream import StreamingSafetensors

KINDS = ("weight", "master", "exp_avg", "exp_avg_sq")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or for another model (one-line message)."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0


@dataclass(frozen=True)
class Piece:
    """A box of a logical tensor held by a local parameter: global ``key`` with ``full`` shape,
    region [offset, offset + size) per dim, found at ``local`` (an index into the local tensor)."""

    key: str
    full: tuple[int, ...]
    offset: tuple[int, ...]
    size: tuple[int, ...]
    local: tuple

    def entry(self, kind: str) -> str:
        return f"{kind}/{self.key}@{','.join(map(str, self.offset))}"


def _runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """Contiguous runs of a sorted index tensor: (global start, length, local start)."""
    idx, runs, start = index.tolist(), [], 0
    for i in range(1, len(idx) + 1):
        if i == len(idx) or idx[i] != idx[i - 1] + 1:
            runs.append((idx[start], i - start, start))
            start = i
    return runs


def param_pieces(name: str, p: torch.Tensor) -> list[Piece]:
    """The logical boxes a local parameter holds, from its role (megamoe.params)."""
    spec = role(p)
    if spec.expert_ids is not None:  # [E_local, ...]: slot -> logical expert
        head, _, leaf = name.rpartition(".")
        shape = tuple(p.shape[1:])
        return [Piece(f"{head}.{gid}.{leaf}", shape, (0,) * len(shape), shape, (slot,))
                for slot, gid in enumerate(spec.expert_ids)]
    full = tuple(spec.init.full_shape or p.shape)  # the logical tensor: padding rows are not part of it
    shard = spec.init.shard
    if shard is None:
        return [Piece(name, full, (0,) * len(full), full, ())]
    pieces: list[Piece] = []
    dim = next(d for d, s in enumerate(shard) if not (isinstance(s, slice) and s == slice(None)))
    s = shard[dim]
    runs = _runs(s) if isinstance(s, torch.Tensor) else [(s.start, s.stop - s.start, 0)]
    for g_start, length, l_start in runs:
        offset = tuple(g_start if d == dim else 0 for d in range(len(full)))
        size = tuple(length if d == dim else full[d] for d in range(len(full)))
        local = tuple(slice(l_start, l_start + length) if d == dim else slice(None) for d in range(len(full)))
        pieces.append(Piece(name, full, offset, size, local))
    return pieces


def is_writer(p: torch.Tensor, mesh: ParallelMesh) -> bool:
    """One copy of every piece: dense params from DP rank 0 (and TP rank 0 when TP-replicated),
    expert params from expert-DP rank 0."""
    if is_expert(p):
        return mesh.coord("edp") == 0
    return mesh.coord("dp") == 0 and (is_tp_split(p) or mesh.tp_rank == 0)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str, state: TrainState, model: nn.Module, optimizer: DistributedOptimizer,
                    cfg: Config, mesh: ParallelMesh, replace_existing: bool = True) -> str:
    """Write the checkpoint of ``state.iteration``; every rank calls it. Returns its directory.
    ``replace_existing=False``: an existing iteration of that number (another run's) is an error."""
    rank, world = mesh.rank, mesh.world_size
    name = f"iter_{state.iteration:07d}"
    final, tmp = os.path.join(directory, name), os.path.join(directory, name + ".tmp")
    if not replace_existing and os.path.isdir(final):  # every rank sees it: all raise, none waits
        raise CheckpointError(f"--save {directory} already holds {name} of another run; not replacing it "
                              "(save elsewhere)")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(world)
    optimizer.finish_param_sync()  # weights still being all-gathered (--overlap-param-gather)
    check_finite(list(model.named_parameters()), f"not saving iteration {state.iteration} to {directory}",
                 "the previous checkpoint is intact")  # before any collective: every rank or none
    step = optimizer.adam_step()
    # every MoE layer's placement (the rebalancer moves each stage's own): a collective over PP, on
    # every rank, before any write
    local = model.placements() if hasattr(model, "placements") else {}
    placements = merge_dicts(local, mesh.groups.get("pp"))
    failure = None
    try:  # a write error (a full disk) must not leave the peers waiting: agree on success first
        write_rank_file(os.path.join(tmp, f"rank_{rank:05d}.safetensors"), model, optimizer, mesh)
        if rank == 0:
            _atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(
                _meta(state, step, placements, cfg, mesh), indent=1))
    except OSError as e:
        failure = e
    failed_rank = _first_failed_rank(failure is not None, rank, world)
    if failed_rank is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = f": {failure.strerror or failure}" if failure is not None else ""
        raise CheckpointError(f"saving iteration {state.iteration} to {directory} failed on rank "
                              f"{failed_rank}{reason}; the previous checkpoint is intact")
    if rank == 0:
        _swap_into_place(tmp, final)
        _atomic_write_text(os.path.join(directory, "latest"), name + "\n")
    _barrier(world)
    return final


def _meta(state: TrainState, step: float, placements: dict[int, ExpertPlacement], cfg: Config,
          mesh: ParallelMesh) -> dict:
    meta = {"format": FORMAT_VERSION, "iteration": state.iteration,
            "consumed_samples": state.consumed_samples, "adam_step": step, "world_size": mesh.world_size,
            "layout": mesh.describe(), "files": mesh.world_size, "config": dataclasses.asdict(cfg)}
    if placements:  # where each logical expert lived, per MoE layer, for a resume at the same EP size
        meta["placement"] = {"ep_size": mesh.ep, "layers": {
            str(layer): {"rank_of": list(p.rank_of), "slot_of": list(p.slot_of)}
            for layer, p in sorted(placements.items())}}
    return meta


def _first_failed_rank(failed: bool, rank: int, world: int) -> int | None:
    """The lowest rank whose part of the save failed, agreed by every rank (it replaces a barrier)."""
    mark = torch.tensor([rank if failed else world], dtype=torch.int64)
    if world > 1:
        dist.all_reduce(mark, op=dist.ReduceOp.MIN)
    return int(mark) if int(mark) < world else None


def write_rank_file(path: str, model: nn.Module, optimizer: DistributedOptimizer, mesh: ParallelMesh) -> None:
    """This rank's pieces (weights, then optimizer state bucket by bucket, streamed to the file as it
    is gathered) and its RNG states. Every rank calls it: gathering sharded state is a collective."""
    rng = {"rng/torch": torch.get_rng_state()}  # every rank its own generator (dropout streams)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["rng/cuda"] = torch.cuda.get_rng_state()
    pieces = {id(p): param_pieces(_global_name(name), p) for name, p in model.named_parameters()
              if is_writer(p, mesh)}
    layout = {name: (t.dtype, tuple(t.shape)) for name, t in rng.items()}
    for p in model.parameters():
        for piece in pieces.get(id(p), ()):
            layout[piece.entry("weight")] = (p.dtype, piece.size)
            for kind in optimizer.state_kinds(p):
                layout[piece.entry(kind)] = (torch.float32, piece.size)
    with StreamingSafetensors(path, layout, {"format": str(FORMAT_VERSION)}) as out:
        for name, t in rng.items():
            out.write(name, t)
        for p in model.parameters():
            for piece in pieces.get(id(p), ()):
                out.write(piece.entry("weight"), p.detach()[piece.local])
        for shard in optimizer.iter_state_shards():  # a collective per bucket and kind
            _write_state_shard(out, shard, pieces)


def _write_state_shard(out: StreamingSafetensors, shard: StateShard, pieces: dict[int, list[Piece]]) -> None:
    """Write the parts of ``shard`` (a flat range of a group's numbering) that fall in pieces this rank
    writes. Every piece is a contiguous flat range of its local parameter (see _flat_range)."""
    hi = shard.lo + shard.values.numel()
    for p in shard.bucket.params:
        start = shard.layout.offsets[id(p)]
        for piece in pieces.get(id(p), ()):
            piece_lo, piece_hi = _flat_range(piece, tuple(p.shape))
            first, last = max(shard.lo, start + piece_lo), min(hi, start + piece_hi)
            if first < last:
                out.write_range(piece.entry(shard.kind), first - start - piece_lo,
                                shard.values[first - shard.lo:last - shard.lo])


def _flat_range(piece: Piece, shape: tuple[int, ...]) -> tuple[int, int]:
    """[lo, hi) of ``piece`` in its local parameter flattened: pieces cut only the first dimension
    (expert slots, TP row blocks) or take the whole local tensor."""
    numel = math.prod(shape)
    if math.prod(piece.size) == numel:
        return 0, numel
    inner = numel // shape[0]
    first = piece.local[0]
    if isinstance(first, int):
        return first * inner, (first + 1) * inner
    return first.start * inner, first.stop * inner


def _global_name(name: str) -> str:
    """Strip the stage-model prefix ``chunks.<c>.``: chunk parameter names are already global."""
    parts = name.split(".")
    return ".".join(parts[2:]) if parts[0] == "chunks" else name


def _swap_into_place(tmp: str, final: str) -> None:
    """Put the complete ``tmp`` at ``final`` without ever deleting the previous ``final`` first: it is
    renamed aside to ``final.old`` (which :func:`resolve_checkpoint` falls back to if a crash hits
    between the two renames) and removed only once the new copy is in place."""
    old = final + ".old"
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(directory: str) -> str | None:
    """The checkpoint directory ``latest`` points to, None if DIR has no checkpoint yet."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"--load {directory} is a file; pass the directory --save wrote (or an "
                              "iter_* directory inside it)")
    if not os.path.isdir(directory):
        return None
    if os.path.isfile(os.path.join(directory, "meta.json")):
        return directory  # pointed straight at an iter_* directory
    pointer = os.path.join(directory, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(directory, name)
    if not os.path.isfile(os.path.join(path, "meta.json")) and os.path.isfile(
            os.path.join(path + ".old", "meta.json")):
        path += ".old"  # a re-save of this iteration was cut between its two renames
    if not os.path.isfile(os.path.join(path, "meta.json")):
        raise CheckpointError(f"checkpoint {path} named by {pointer} is missing or incomplete; "
                              "point --load at an intact iter_* directory")
    return path


def holds_checkpoints(directory: str) -> bool:
    """Whether ``directory`` already holds saved checkpoints (a ``latest`` pointer or iter_* dirs)."""
    if not os.path.isdir(directory):
        return False
    return os.path.exists(os.path.join(directory, "latest")) or any(
        name.startswith("iter_") and not name.endswith(".tmp") for name in os.listdir(directory))


def check_save_directory(save: str | None, resumed_from_save: bool, allow_existing: bool) -> bool:
    """Before step 1: a run that did not resume from its --save directory must not write into one that
    holds another run's checkpoints (its saves would replace that run's iterations and move
    ``latest``); an unwritable --save fails now, not at the first save. Returns whether --save holds
    another run's checkpoints (allowed by ``allow_existing``: then none of them may be replaced)."""
    if save is None:
        return False
    if os.path.exists(save) and not os.path.isdir(save):
        raise CheckpointError(f"--save {save} is a file; pass a directory")
    other_runs = holds_checkpoints(save) and not resumed_from_save
    if other_runs and not allow_existing:
        raise CheckpointError(f"--save {save} already holds checkpoints of another run and this run did not "
                              "resume from it; pass --load with the same directory to continue it, or "
                              "--allow-existing-save-dir")
    try:
        os.makedirs(save, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"--save {save} cannot be created ({e.strerror})") from e
    if not os.access(save, os.W_OK):
        raise CheckpointError(f"--save {save} is not writable")
    return other_runs


def saved_placement(directory: str, ep_size: int) -> dict[int, ExpertPlacement] | None:
    """The expert placement of every MoE layer (by global index) the checkpoint in ``directory`` was
    trained with, if it was saved under the same EP size (under another EP size the default placement
    is used: pieces are keyed by logical expert, so any placement loads)."""
    path = resolve_checkpoint(directory)
    if path is None:
        return None
    meta = read_meta(path)
    saved = meta.get("placement")
    if not saved or saved["ep_size"] != ep_size:
        return None
    return {layer: ExpertPlacement(rank_of=tuple(table["rank_of"]), slot_of=tuple(table["slot_of"]),
                                   ep_size=ep_size)
            for layer, table in _placement_tables(saved, meta["config"]["model"]["num_layers"]).items()}


def _placement_tables(saved: dict[str, Any], num_layers: int) -> dict[int, dict[str, Any]]:
    """{layer: {"rank_of", "slot_of"}} from meta.json's placement: per layer, or (format of earlier
    versions, before the rebalancer) one table for every layer."""
    if "layers" in saved:
        return {int(layer): table for layer, table in saved["layers"].items()}
    return {layer: saved for layer in range(num_layers)}


def read_meta(path: str) -> dict[str, Any]:
    """meta.json of a checkpoint directory, checked to be in this format."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta: dict[str, Any] = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}/meta.json is unreadable ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}/meta.json holds a {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT_VERSION or "files" not in meta:
        found = meta.get("format", "pre-1")
        raise CheckpointError(f"checkpoint {path} has format {found}, this megamoe reads format "
                              f"{FORMAT_VERSION}; save it again with a matching version")
    for key in ("iteration", "consumed_samples", "world_size", "files"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 0:
            raise CheckpointError(f"checkpoint {path}/meta.json: {key} is {meta.get(key)!r}, not a "
                                  "non-negative integer")
    config = meta.get("config")
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("model", "moe")):
        raise CheckpointError(f"checkpoint {path}/meta.json has no model config")
    _check_placement(meta.get("placement"), config, path)
    return meta


def _check_placement(saved: Any, config: dict[str, Any], path: str) -> None:
    """A saved expert placement must be, for each layer, a table over every logical expert that gives
    each EP rank its share of experts in distinct slots."""
    if saved is None:
        return
    num_experts, num_layers = config["moe"].get("num_experts"), config["model"].get("num_layers")
    ok = isinstance(saved, dict) and isinstance(saved.get("ep_size"), int) and saved["ep_size"] > 0
    ok = ok and isinstance(num_layers, int) and isinstance(saved.get("layers", {}), dict)
    try:
        tables = _placement_tables(saved, num_layers) if ok else {}
        ok = ok and all(_is_table(table, num_experts, saved["ep_size"]) for table in tables.values())
    except (ValueError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(f"checkpoint {path}/meta.json has an expert placement that is not a table "
                              f"of {num_experts} experts over its EP ranks; remove it or save again")


def _is_table(table: Any, num_experts: Any, ep_size: int) -> bool:
    if not isinstance(table, dict):
        return False
    rank_of, slot_of = table.get("rank_of"), table.get("slot_of")
    if not (isinstance(rank_of, list) and isinstance(slot_of, list)
            and len(rank_of) == len(slot_of) == num_experts):
        return False
    ExpertPlacement.from_ranks(list(rank_of), ep_size)  # each rank its share (ValueError otherwise)
    per_rank = num_experts // ep_size
    return all(sorted(slot_of[e] for e in range(num_experts) if rank_of[e] == rank) == list(range(per_rank))
               for rank in range(ep_size))


class _Index:
    """Where every saved piece lives: (kind, key) -> [(file, entry, offset, shape)]."""

    def __init__(self, path: str, files: int) -> None:
        self.entries: dict[tuple[str, str], list[tuple[str, str, tuple[int, ...], tuple[int, ...]]]] = {}
        self.files = [os.path.join(path, f"rank_{r:05d}.safetensors") for r in range(files)]
        self._open: dict[str, Any] = {}
        for file in self.files:
            handle = self._handle(file)
            for entry in handle.keys():
                if "@" not in entry:
                    continue
                kind_key, offset = entry.rsplit("@", 1)
                kind, key = kind_key.split("/", 1)
                shape = tuple(handle.get_slice(entry).get_shape())
                self.entries.setdefault((kind, key), []).append(
                    (file, entry, tuple(int(x) for x in offset.split(",") if x != ""), shape))

    def _handle(self, file: str):
        if file not in self._open:
            try:
                self._open[file] = safe_open(file, framework="pt")
            except FileNotFoundError as e:
                raise CheckpointError(f"checkpoint file {file} is missing") from e
            except Exception as e:  # truncated or not safetensors
                raise CheckpointError(f"checkpoint file {file} is corrupt ({type(e).__name__}: {e})") from e
        return self._open[file]

    def has(self, kind: str, key: str) -> bool:
        return (kind, key) in self.entries

    def read(self, kind: str, piece: Piece, out: torch.Tensor) -> None:
        """Fill ``out`` (shaped piece.size) with the saved region of (kind, piece.key)."""
        covered = 0
        for file, entry, offset, shape in self.entries.get((kind, piece.key), []):
            lo = [max(a, b) for a, b in zip(offset, piece.offset)]
            hi = [min(a + s, b + t) for a, s, b, t in zip(offset, shape, piece.offset, piece.size)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            src = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, offset))
            dst = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, piece.offset))
            out[dst] = self._handle(file).get_slice(entry)[src].to(out.dtype)
            n = 1
            for low, h in zip(lo, hi):
                n *= h - low
            covered += n
        if covered != out.numel():
            raise CheckpointError(f"checkpoint lacks {kind} of {piece.key} region {piece.offset}+"
                                  f"{piece.size} (saved by a different model?)")


def check_finite(params: list[tuple[str, nn.Parameter]], where: str, fix: str) -> None:
    """One line naming the first parameter holding NaN or Inf. One pass over the weights, no copy of
    them: a norm is finite exactly when every entry is (fp32/bf16 norms of sane weights cannot overflow)."""
    if not params:
        return
    norms = torch.stack([n.float() for n in torch._foreach_norm([p.detach() for _, p in params])])
    bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()  # the one device-to-host read
    if bad:
        raise CheckpointError(f"{where}: weight {_global_name(params[bad[0]][0])} holds NaN or Inf; {fix}")


def load_checkpoint(directory: str, model: nn.Module, optimizer: DistributedOptimizer | None,
                    mesh: ParallelMesh, cfg: Config | None = None, allow_nonfinite: bool = False,
                    load_optim: bool = True, finetune: bool = False) -> TrainState | None:
    """Restore weights, optimizer state and RNG from ``directory`` (or its ``latest``) under this
    rank's layout, whatever layout saved it. None if there is no checkpoint yet. Megatron's
    ``load_optim=False`` (--no-load-optim) leaves AdamW's moments and step fresh; ``finetune``
    (--finetune) also starts at iteration 0 with the RNG as seeded: only the weights are taken."""
    load_optim = load_optim and not finetune
    path = resolve_checkpoint(directory)
    if path is None:
        return None
    meta = read_meta(path)
    if cfg is not None:
        _check_same_model(meta, cfg, path)
    index = _Index(path, int(meta["files"]))
    if optimizer is not None:
        optimizer.finish_param_sync()  # a pending gather must not overwrite the loaded weights
    params = list(model.named_parameters())
    states: dict[int, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for pname, p in params:
            pieces = param_pieces(_global_name(pname), p)
            st: dict[str, torch.Tensor] = {}
            for kind in KINDS:
                if kind in ("exp_avg", "exp_avg_sq") and not load_optim:
                    continue
                if kind != "weight" or role(p).init.zeros:  # zeros: state a run may not have kept
                    if not all(index.has(kind, pc.key) for pc in pieces):  # (FP8 amax history): empty
                        continue
                target = p.data if kind == "weight" else torch.zeros(p.shape, dtype=torch.float32)
                for pc in pieces:
                    buf = torch.empty(pc.size, dtype=target.dtype)
                    index.read(kind, pc, buf)
                    target[pc.local] = buf.to(target.device)
                if kind != "weight":
                    st[kind] = target
            st.setdefault("master", p.detach().float().cpu().clone())  # fp32 weights are the masters
            states[id(p)] = st
    if not allow_nonfinite:
        check_finite(params, f"checkpoint {path}", "pass --allow-nonfinite-load to continue from it anyway")
    if optimizer is not None:
        optimizer.load_full_param_states(states, float(meta.get("adam_step", 0.0)) if load_optim else 0.0)
    if finetune:
        return TrainState()
    _load_rng(index, mesh.rank if int(meta["world_size"]) == mesh.world_size else 0)
    return TrainState(iteration=int(meta["iteration"]), consumed_samples=int(meta["consumed_samples"]))


def _load_rng(index: _Index, source_rank: int) -> None:
    """Restore the generators this rank saved (same world size), else those of rank 0: under another
    layout no rank corresponds to this one, and parameter init does not depend on them anyway."""
    handle = index._handle(index.files[source_rank])
    if "rng/torch" in handle.keys():
        torch.set_rng_state(handle.get_tensor("rng/torch"))
    if "rng/cuda" in handle.keys() and torch.cuda.is_available():
        torch.cuda.set_rng_state(handle.get_tensor("rng/cuda"))


def _check_same_model(meta: dict[str, Any], cfg: Config, path: str) -> None:
    saved = meta["config"]["model"]
    for field in ("num_layers", "hidden_size", "num_attention_heads", "kv_channels", "ffn_hidden_size",
                  "vocab_size"):
        if saved[field] != getattr(cfg.model, field):
            raise CheckpointError(f"checkpoint {path} has {field.replace('_', '-')} {saved[field]}, this run "
                                  f"{getattr(cfg.model, field)}; load it with the same model shape")
    family = saved.get("model_family", "openmoe")  # checkpoints from before the Mixtral family
    if family != cfg.model.model_family:
        raise CheckpointError(f"checkpoint {path} holds a {family} model, this run builds "
                              f"{cfg.model.model_family}; pass --model-family {family}")
    kv_heads = (saved.get("num_query_groups") if saved.get("group_query_attention") else None) or \
        saved["num_attention_heads"]
    if kv_heads != cfg.model.kv_heads:
        raise CheckpointError(f"checkpoint {path} has {kv_heads} key/value heads, this run "
                              f"{cfg.model.kv_heads}; load it with the same --num-query-groups")
    if meta["config"]["moe"]["num_experts"] != cfg.moe.num_experts:
        raise CheckpointError(f"checkpoint {path} has {meta['config']['moe']['num_experts']} experts, this "
                              f"run {cfg.moe.num_experts}; load it with the same --num-experts")
