"""ParallelMesh: one rank grid -> named process groups, passed explicitly (no module globals).

Dense mesh  (fastest-varying first): TP x DP x PP     rank = tp + TP*(dp + DP*pp)
Expert mesh (same ranks, folded):    ETP x EP x EDP x PP with EDP = world / (ETP*EP*PP)
TP varies fastest so TP groups stay inside a node (docs/ARCHITECTURE.md, "Rank grid").
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from megamoe.config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # "torchrun", "slurm" or "single"


def detect_launch(env: dict[str, str] | None = None) -> LaunchInfo:
    """Rank and size from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or Slurm (SLURM_PROCID/NTASKS/LOCALID)."""
    env = dict(os.environ) if env is None else env

    def number(name: str, default: str | None = None) -> int:
        text = env.get(name, default) if default is not None else env[name]
        try:
            return int(text.split("(")[0] or "0")  # Slurm writes e.g. "4(x2)"
        except ValueError:
            raise ConfigError(f"environment variable {name}={text!r} is not an integer; it comes from the "
                              "launcher (torchrun or Slurm): unset it or fix it") from None

    if "RANK" in env and "WORLD_SIZE" in env:
        world = number("WORLD_SIZE")
        info = LaunchInfo(number("RANK"), world, number("LOCAL_RANK", "0"),
                          number("LOCAL_WORLD_SIZE", str(world)), "torchrun")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = number("SLURM_NTASKS")
        info = LaunchInfo(number("SLURM_PROCID"), world, number("SLURM_LOCALID", "0"),
                          number("SLURM_NTASKS_PER_NODE", "0") or world, "slurm")
    else:
        return LaunchInfo(0, 1, 0, 1, "single")
    if not (world >= 1 and 0 <= info.rank < world):
        raise ConfigError(f"rank {info.rank} of world size {world} from the {info.launcher} environment is "
                          "out of range; check the launcher's variables")
    return info


def init_distributed(info: LaunchInfo, backend: str | None = None,
                     timeout_minutes: float = 10.0) -> str:
    """Create the default process group (gloo on CPU, NCCL on GPU); no-op for a single process.

    Slurm launches need MASTER_ADDR/MASTER_PORT in the environment (the sbatch script exports them).
    """
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if info.world_size == 1 or dist.is_initialized():
        return backend
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if "MASTER_ADDR" not in os.environ:
        raise ConfigError("MASTER_ADDR is not set: launch with torchrun, or export MASTER_ADDR and "
                          "MASTER_PORT in the Slurm script")
    dist.init_process_group(process_group_backend(backend), rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return backend


def process_group_backend(backend: str) -> str:
    """The torch.distributed backend string for ``backend``. NCCL handles CUDA tensors only, and the
    training loop also reduces small CPU tensors (logged losses, stop flags, ZeRO norm parts), so
    with NCCL every group also gets a gloo backend for CPU tensors."""
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


@dataclass
class ParallelMesh:
    """Sizes, this rank's coordinates and its groups. Groups are None when the world is 1."""

    world_size: int
    rank: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    sequence_parallel: bool = False
    ranks_per_node: int = 0  # 0: every rank on one node (no hierarchical all-to-all)
    dp: int = field(init=False)
    edp: int = field(init=False)
    groups: dict[str, dist.ProcessGroup | None] = field(default_factory=dict, repr=False)
    members: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.world_size % (self.tp * self.pp):
            raise ConfigError(f"world size {self.world_size} is not divisible by TP {self.tp} x "
                              f"PP {self.pp}")
        if self.world_size % (self.etp * self.ep * self.pp):
            raise ConfigError(f"world size {self.world_size} is not divisible by ETP {self.etp} x "
                              f"EP {self.ep} x PP {self.pp}")
        self.dp = self.world_size // (self.tp * self.pp)
        self.edp = self.world_size // (self.etp * self.ep * self.pp)
        rpn = self.ranks_per_node
        if rpn and (self.world_size % rpn or (self.ep > rpn and self.ep % rpn) or
                    (self.ep < rpn and rpn % (self.ep * self.etp))):
            raise ConfigError(f"ranks per node {rpn} does not tile world size {self.world_size} into "
                              f"nodes that split the expert-parallel groups of {self.ep} evenly")

    @staticmethod
    def from_config(p: ParallelConfig, world_size: int, rank: int,
                    local_world_size: int | None = None) -> ParallelMesh:
        """``--moe-ranks-per-node`` (or MEGAMOE_RANKS_PER_NODE) overrides the launcher's node size,
        so CPU tests can pretend e.g. 2 nodes x 4 ranks."""
        rpn = p.moe_ranks_per_node or int(os.environ.get("MEGAMOE_RANKS_PER_NODE", "0"))
        if not rpn and local_world_size and local_world_size < world_size:
            rpn = local_world_size
        return ParallelMesh(world_size=world_size, rank=rank, tp=p.tensor_model_parallel_size,
                            pp=p.pipeline_model_parallel_size, ep=p.expert_model_parallel_size,
                            etp=p.expert_tensor_parallel_size,
                            sequence_parallel=p.sequence_parallel, ranks_per_node=rpn)

    def grids(self) -> dict[str, list[list[int]]]:
        """For each group name, the list of rank lists (every group of that kind)."""
        ranks = np.arange(self.world_size)
        dense = ranks.reshape(self.pp, self.dp, self.tp)  # [pp, dp, tp], tp fastest
        expert = ranks.reshape(self.pp, self.edp, self.ep, self.etp)  # [pp, edp, ep, etp]

        def along(grid: np.ndarray, axis: int) -> list[list[int]]:
            moved = np.moveaxis(grid, axis, -1)
            return moved.reshape(-1, grid.shape[axis]).tolist()

        return {
            "tp": along(dense, 2), "dp": along(dense, 1), "pp": along(dense, 0),
            "ep": along(expert, 2), "edp": along(expert, 1), "etp": along(expert, 3),
            # model-parallel (TP x PP) and the dense DP x TP block used for grad-norm reductions
            "mp": [g.reshape(-1).tolist() for g in np.moveaxis(dense, 1, 0)],
            "stage": [g.reshape(-1).tolist() for g in dense],  # every rank of one pipeline stage
            **self._ep_node_grids(along(expert, 2)),
        }

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node if self.ranks_per_node else 0

    def _ep_node_grids(self, ep_groups: list[list[int]]) -> dict[str, list[list[int]]]:
        """Split every EP group by node: ``ep_intra`` = its members on one node, ``ep_inter`` = its
        members with the same position on their node (one per node). Hierarchical all-to-all runs
        intra-node, then inter-node among same-position ranks."""
        intra, inter = [], []
        for members in ep_groups:
            by_node: dict[int, list[int]] = {}
            for r in members:
                by_node.setdefault(self.node_of(r), []).append(r)
            nodes = list(by_node.values())
            intra += nodes
            inter += [[node[j] for node in nodes] for j in range(len(nodes[0]))]
        return {"ep_intra": intra, "ep_inter": inter}

    def build_groups(self, timeout_minutes: float | None = None) -> None:
        """Create every group on every rank in the same order (torch.distributed requires it).

        Subgroups get the job's timeout explicitly: torch's default for them is 30 minutes, so a
        hung peer would otherwise stall collectives far past --distributed-timeout-minutes."""
        timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes else None
        for name, all_groups in self.grids().items():
            for members in all_groups:
                # one-rank groups stay None: every collective helper treats None as "nothing to do"
                group = dist.new_group(members, timeout=timeout) if len(members) > 1 else None
                if self.rank in members:
                    self.groups[name], self.members[name] = group, members
        for name, size in (("tp", self.tp), ("dp", self.dp), ("pp", self.pp), ("ep", self.ep),
                           ("edp", self.edp), ("etp", self.etp)):
            assert len(self.members[name]) == size, (name, self.members[name], size)

    def coord(self, name: str) -> int:
        """This rank's index inside its ``name`` group."""
        return self.members[name].index(self.rank) if name in self.members else 0

    @property
    def tp_rank(self) -> int:
        return self.coord("tp")

    @property
    def dp_rank(self) -> int:
        return self.coord("dp")

    @property
    def pp_rank(self) -> int:
        return self.coord("pp")

    @property
    def ep_rank(self) -> int:
        return self.coord("ep")

    def describe(self) -> str:
        return (f"world {self.world_size} = TP {self.tp} x DP {self.dp} x PP {self.pp} (dense); "
                f"ETP {self.etp} x EP {self.ep} x EDP {self.edp} x PP {self.pp} (experts); "
                f"SP {'on' if self.sequence_parallel else 'off'}"
                + (f"; {self.ranks_per_node} ranks per node" if self.ranks_per_node else ""))


def build_mesh(p: ParallelConfig, info: LaunchInfo) -> ParallelMesh:
    mesh = ParallelMesh.from_config(p, info.world_size, info.rank, info.local_world_size)
    mesh.build_groups(p.distributed_timeout_minutes)
    return mesh
