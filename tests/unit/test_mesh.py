"""The rank grid: TP fastest, dense TP x DP x PP and expert ETP x EP x EDP x PP over the same ranks."""

import pytest

from megamoe.config import ConfigError
from megamoe.parallel.mesh import ParallelMesh, detect_launch


def test_grid_world8_tp2_pp2_ep2():
    m = ParallelMesh(world_size=8, rank=5, tp=2, pp=2, ep=2)
    assert (m.dp, m.edp) == (2, 2)
    g = m.grids()
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # ETP=1: the experts fold each stage's TP x DP ranks into EP (fastest) x EDP
    assert g["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["edp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert "world 8 = TP 2 x DP 2 x PP 2" in m.describe()


def test_grid_ep4_dp2():
    g = ParallelMesh(world_size=8, rank=0, ep=4).grids()
    assert g["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]] and g["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_world_that_does_not_factor_is_a_clear_error():
    with pytest.raises(ConfigError, match="world size 6 is not divisible by TP 4"):
        ParallelMesh(world_size=6, rank=0, tp=4)
    with pytest.raises(ConfigError, match="EP 4"):
        ParallelMesh(world_size=6, rank=0, ep=4)


def test_single_process_groups_and_coordinates():
    m = ParallelMesh(world_size=1, rank=0)
    m.build_groups()
    assert m.tp_rank == m.dp_rank == m.pp_rank == m.ep_rank == 0 and m.groups["tp"] is None


def test_detect_launch_torchrun_and_slurm():
    t = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (t.rank, t.world_size, t.local_rank, t.local_world_size, t.launcher) == (3, 8, 1, 2, "torchrun")
    s = detect_launch({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                       "SLURM_NTASKS_PER_NODE": "8(x2)"})
    assert (s.rank, s.world_size, s.local_rank, s.local_world_size, s.launcher) == (9, 16, 1, 8, "slurm")
    assert detect_launch({}).launcher == "single"


def test_nccl_groups_also_carry_gloo_for_cpu_tensors():
    from megamoe.parallel.mesh import process_group_backend

    assert process_group_backend("nccl") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("gloo") == "gloo"


def _device_mapped_backend(rank, world):
    import torch
    import torch.distributed as dist

    from megamoe.parallel.mesh import ParallelMesh

    # the harness joined with plain gloo; a device-mapped group must also serve CPU collectives
    mesh = ParallelMesh(world_size=world, rank=rank, tp=2)
    mesh.build_groups()
    mapped = dist.new_group(list(range(world)), backend="cpu:gloo")
    t = torch.tensor([float(rank + 1)], dtype=torch.float64)
    dist.all_reduce(t, group=mapped)
    return t.item()


def test_device_mapped_backend_string_reduces_cpu_tensors():
    from tests.harness import run_ranks

    assert run_ranks(2, _device_mapped_backend) == [3.0, 3.0]
