"""The parallel planner (issue 19): layouts megamoe accepts, the step-time model's terms by hand, the
ranking where it is obvious, flags that round-trip through megamoe's parser, and the one-line error of
a cluster too small for the model."""

from __future__ import annotations

import dataclasses
import json

import pytest

from megamoe.arguments import parse_args
from megamoe.planner.calibrate import Calibration, LinkFit, fit_link
from megamoe.planner.cost import (
    Cluster,
    StepBreakdown,
    bubble_fraction,
    busiest,
    estimate,
    expert_load_by_layer,
    load_imbalance,
    lower_bound,
    rank_layouts,
    spearman,
    step_flops,
)
from megamoe.planner.layouts import Layout, SearchSpace, enumerate_layouts, layout_of
from megamoe.planner.memory import memory_per_rank
from megamoe.planner.step_traffic import StepTraffic
from megamoe.planner.traffic import Traffic
from megamoe.training.metrics import model_flops_per_token
from tools import plan_parallel

TINY = ["--model-preset", "openmoe-tiny", "--mock-data", "--seq-length", "32", "--global-batch-size", "16"]
SMALL_SPACE = SearchSpace(micro_batch_sizes=(1, 2), chunks=(1, 2))


def tiny_cluster(**kw) -> Cluster:
    return Cluster(**{**dict(nodes=1, gpus_per_node=4, gpu_memory_gib=1.0, peak_tflops=1.0,
                             intra_node_bandwidth=10.0, inter_node_bandwidth=1.0), **kw})


def layout(**kw) -> Layout:
    base = dict(tp=1, sp=False, pp=1, vp=1, ep=1, micro_batch_size=2, zero=0, exchange="flat", chunks=1,
                recompute=None, world_size=4, ranks_per_node=4)
    return Layout(**{**base, **kw})


def test_every_enumerated_layout_is_one_megamoe_accepts_and_its_flags_round_trip():
    base = parse_args(TINY)
    layouts = enumerate_layouts(base, 8, 4, SMALL_SPACE)
    assert len(layouts) > 100
    kinds = {(x.tp > 1, x.pp > 1, x.vp > 1, x.ep > 1, x.zero, x.exchange, x.chunks > 1) for x in layouts}
    assert {x[5] for x in kinds} == {"flat", "hierarchical", "tp-dedup"}
    assert {x[4] for x in kinds} == {0, 1, 2}
    for lay in layouts[::7]:  # every 7th: the parse is ~ms each
        cfg = parse_args(TINY + lay.flags(base.model.num_layers)).validate(8)
        assert cfg == lay.apply(base)
        assert layout_of(cfg, 8, 4) == lay  # and back: what --evaluate reads from a script's flags


def test_layouts_megamoe_rejects_are_not_listed():
    base = parse_args(TINY)
    for lay in enumerate_layouts(base, 4, 4, SMALL_SPACE):
        assert base.model.num_attention_heads % lay.tp == 0 and base.moe.num_experts % lay.ep == 0
        assert not (lay.recompute == "full" and lay.chunks > 1)
        assert lay.exchange != "hierarchical"  # one node: no EP group spans nodes
    # 3 ranks: TP/EP 3 divide neither heads (4) nor experts (8); only DP 3 / PP 3 ... and the batch 16
    # is not divisible by 3 micro-batch groups, so nothing is left
    assert enumerate_layouts(base, 3, 3, SMALL_SPACE) == []


def test_bubble_formula():
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, vp=2) == pytest.approx(3 / 19)
    assert bubble_fraction(1, 8) == 0.0
    # in the model: the bubble is (PP - 1) / VP micro-batch slots of the busy time; as a share of the
    # step it is the formula above
    base = parse_args(TINY + ["--num-layers", "8"])
    cluster = tiny_cluster(nodes=1, gpus_per_node=4)
    for vp in (1, 2):
        lay = layout(pp=4, vp=vp, micro_batch_size=1)  # DP 1: 16 micro-batches
        b = estimate(lay.apply(base), lay, cluster, StepTraffic())
        busy = b.compute_s + b.fixed_s
        assert b.pp_bubble_s == pytest.approx(3 / vp * busy / 16)
        assert b.pp_bubble_s / (busy + b.pp_bubble_s) == pytest.approx(bubble_fraction(4, 16, vp))


def test_compute_term_by_hand():
    base = parse_args(TINY)
    m = base.model
    tokens = 16 * 32
    total = model_flops_per_token(base) * tokens
    head = 6 * m.hidden_size * m.padded_vocab_size(1) * tokens
    expert = 3 * 2 * 2 * 4 * m.hidden_size * m.ffn_hidden_size * 2 * tokens  # top-2, 2 MoE layers of 4
    f = step_flops(base, layout(ep=4))  # DP 4, EP 4: everything split 4 ways
    assert f.dense + f.expert == pytest.approx(total / 4)
    assert f.expert == pytest.approx(expert / 4)
    f = step_flops(base, layout(pp=2))  # DP 2: the last stage runs half the layers and the whole head
    assert f.dense == pytest.approx(((total - head - expert) / 2 + head) / 2)
    f = step_flops(base, layout(tp=2, exchange="flat"))  # TP copies: each TP rank runs every expert
    assert f.expert == pytest.approx(expert * 2 / 4)
    f = step_flops(base, layout(recompute="full"))
    assert f.recompute == pytest.approx((f.dense - head / 4 + f.expert) / 3)
    # ranks sharing cores (8 ranks on 2 cores) get a quarter of the rate each
    cpu = tiny_cluster(gpus_per_node=8, cores=2, efficiency=1.0)
    lay8 = layout(world_size=8, ranks_per_node=8)
    b = estimate(lay8.apply(base), lay8, cpu, StepTraffic())
    f8 = step_flops(base, lay8)
    assert b.compute_s == pytest.approx((f8.dense + f8.expert) / (1e12 * 2 / 8))


def test_expert_load_imbalance():
    base = parse_args(TINY)
    skewed = [[8, 0, 0, 0, 0, 0, 0, 0], [1] * 8]  # layer 1: all on expert 0; layer 3: uniform
    # EP 4, 2 experts per rank: layer 1 busiest 8 over mean 2, layer 3 busiest 2 over mean 2
    assert load_imbalance(base, 4, skewed) == pytest.approx((8 + 2) / (2 + 2))
    assert load_imbalance(base, 1, skewed) == 1.0 and load_imbalance(base, 4, None) == 1.0


def test_communication_terms_by_hand_and_overlap():
    base = parse_args(TINY)
    lay = layout(ep=4, chunks=2)
    cluster = tiny_cluster(intra_latency_s=1e-3)
    exchange = Traffic(bytes_intra=2e9, msgs_intra=10)
    grads = Traffic(bytes_intra=1e9, msgs_intra=4)
    traffic = dataclasses.replace(StepTraffic(), expert_exchange=dataclasses.replace(
        StepTraffic().expert_exchange, forward=exchange), dense_grad=dataclasses.replace(
        StepTraffic().dense_grad, backward=grads))
    cfg = lay.apply(base)
    b = estimate(cfg, lay, cluster, traffic)
    assert b.exchange_intra_s == pytest.approx(2e9 / 10e9 + 10 * 1e-3)
    assert b.dp_reduce_s == pytest.approx(1e9 / 10e9 + 4 * 1e-3)
    expert_s = step_flops(cfg, lay).expert / (1e12 * 0.5)
    assert b.exchange_hidden_s == pytest.approx(min(b.exchange_intra_s, expert_s) / 2)  # K = 2
    assert b.grad_reduce_hidden_s > 0  # --overlap-grad-reduce (DP 4)
    # ranks sharing cores: nothing overlaps
    shared = estimate(cfg, lay, tiny_cluster(intra_latency_s=1e-3, cores=2), traffic)
    assert shared.exchange_hidden_s == 0 and shared.grad_reduce_hidden_s == 0
    assert shared.total_s > b.total_s


def test_lower_bound_holds():
    base = parse_args(TINY)
    cluster = tiny_cluster()
    for lay in enumerate_layouts(base, 4, 4, SMALL_SPACE)[::40]:
        cfg = lay.apply(base)
        opt = memory_per_rank(cfg, 4).optimizer
        assert lower_bound(cfg, lay, cluster, None, opt) <= busiest(cfg, lay, cluster, None, opt).total_s


def test_obvious_ranking():
    """Compute-bound (a slow GEMM rate, fast links): no bubble, no recomputation, no duplicated experts
    and no TP collectives win; a crawling inter-node link keeps the expert exchange inside a node."""
    base = parse_args(TINY)
    slow = tiny_cluster(peak_tflops=1e-4, intra_node_bandwidth=1e4, inter_node_bandwidth=1e4,
                        intra_latency_s=0, inter_latency_s=0)
    ranking = rank_layouts(base, slow, space=SMALL_SPACE, top=3)
    best = ranking.plans[0].layout
    assert best.pp == 1 and best.recompute is None and best.tp == 1
    assert ranking.plans[0].step_time_s <= ranking.plans[1].step_time_s <= ranking.plans[2].step_time_s
    # 2 nodes x 4: EP 8 spans the nodes, EP 4 does not; with a slow inter-node latency the
    # hierarchical exchange (one inter-node message per exchange instead of one per remote rank) wins
    split = tiny_cluster(nodes=2, gpus_per_node=4, inter_latency_s=0.1)
    times = {}
    for ep, exchange in ((4, "flat"), (8, "flat"), (8, "hierarchical")):
        lay = layout(ep=ep, world_size=8, ranks_per_node=4, exchange=exchange)
        cfg = lay.apply(base)
        times[ep, exchange] = busiest(cfg, lay, split, None, memory_per_rank(cfg, 8).optimizer)
    assert times[4, "flat"].exchange_inter_s == 0 < times[8, "hierarchical"].exchange_inter_s
    assert times[8, "hierarchical"].exchange_inter_s < times[8, "flat"].exchange_inter_s
    assert times[8, "hierarchical"].total_s < times[8, "flat"].total_s


def test_fit_link_and_spearman():
    fit = fit_link([(0, 1e-3), (1e9, 1e-3 + 0.5), (2e9, 1e-3 + 1.0)])
    assert fit.latency_s == pytest.approx(1e-3) and fit.bandwidth_gbs == pytest.approx(2.0)
    assert LinkFit(1e-3, 2.0).seconds(4e9, messages=3) == pytest.approx(2.003)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


def test_cli_json_flags_parse_into_a_valid_config(capsys):
    rc = plan_parallel.main(TINY + ["--nodes", "1", "--gpus-per-node", "4", "--gpu-memory-gib", "1",
                                    "--top", "3", "--json", "--max-evaluations", "60"])
    assert rc == 0
    plans = json.loads(capsys.readouterr().out)
    assert len(plans) == 3
    assert [p["step_time_s"] for p in plans] == sorted(p["step_time_s"] for p in plans)
    for p in plans:
        cfg = parse_args(p["flags"]).validate(4)
        assert cfg.parallel.tensor_model_parallel_size == p["layout"]["tp"]
        assert p["memory_gib"] <= 1.0 and set(p["breakdown"]) >= {"compute_s", "pp_bubble_s", "total_s"}
        assert p["breakdown"]["total_s"] == pytest.approx(p["step_time_s"])
        assert set(StepBreakdown.__dataclass_fields__) <= set(p["breakdown"])


def test_cli_human_output_and_evaluate(capsys):
    given = "--tensor-model-parallel-size 2 --micro-batch-size 1"
    assert plan_parallel.main(TINY + ["--gpus-per-node", "2", "--top", "2", "--max-evaluations", "20",
                                      "--evaluate", given]) == 0
    out = capsys.readouterr().out
    assert out.count("flags: --model-preset openmoe-tiny") == 3 and "memory" in out and "compute" in out
    assert "--evaluate: " in out and "#0 TP2 PP1 EP1 DP1 mbs1 no-ZeRO tp-dedup" in out


def test_too_small_cluster_is_one_line(capsys):
    rc = plan_parallel.main(["--model-preset", "openmoe-34b", "--global-batch-size", "8", "--nodes", "1",
                             "--gpus-per-node", "1", "--gpu-memory-gib", "16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith("plan_parallel.py: error: openmoe-34b needs at least ")
    need = float(err.split("needs at least ")[1].split(" GiB")[0])
    short = float(err.split("is ")[-1].split(" GiB short")[0])
    assert need > 16 and short == pytest.approx(need - 16, abs=0.1)


def test_memory_headroom_is_kept_free(capsys):
    """--memory-headroom-gib: the too-small line counts it, and every listed layout leaves it free."""
    base = ["--model-preset", "openmoe-34b", "--global-batch-size", "8", "--nodes", "1",
            "--gpus-per-node", "1", "--gpu-memory-gib", "16"]
    assert plan_parallel.main(base + ["--memory-headroom-gib", "4"]) == 2
    err = capsys.readouterr().err.strip()
    need = float(err.split("needs at least ")[1].split(" GiB")[0])
    short = float(err.split("is ")[-1].split(" GiB short")[0])
    assert "less --memory-headroom-gib 4" in err and short == pytest.approx(need - 12, abs=0.1)
    assert plan_parallel.main(TINY + ["--gpus-per-node", "2", "--top", "50", "--max-evaluations", "50",
                                      "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    most = max(plan["memory_gib"] for plan in plans)
    memory = most * 0.999  # just under the largest listed layout: it no longer fits
    assert plan_parallel.main(TINY + ["--gpus-per-node", "2", "--top", "50", "--max-evaluations", "50",
                                      "--json", "--gpu-memory-gib", f"{memory + 1}",
                                      "--memory-headroom-gib", "1"]) == 0
    kept = json.loads(capsys.readouterr().out)
    largest = max(plans, key=lambda plan: plan["memory_gib"])["label"]
    assert kept and all(plan["memory_gib"] <= memory for plan in kept)
    assert largest not in {plan["label"] for plan in kept}


@pytest.mark.parametrize("argv, message", [
    (["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size is chosen by the planner"),
    (["--gpu-memory-gib", "0"], "--gpu-memory-gib must be positive"),
    (["--memory-headroom-gib", "80"], "--memory-headroom-gib must be in [0, --gpu-memory-gib 80)"),
    (["--expert-load", "/nonexistent.json"], "cannot read --expert-load"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    assert plan_parallel.main(TINY + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_expert_load_file_must_match_the_model(tmp_path, capsys):
    path = tmp_path / "loads.json"
    path.write_text(json.dumps([[1] * 8]))  # openmoe-tiny has 2 MoE layers
    assert plan_parallel.main(TINY + ["--expert-load", str(path)]) == 2
    assert "--expert-load has 1 MoE layer(s), the model 2" in capsys.readouterr().err


def test_calibration_round_trip_and_cluster(tmp_path):
    cal = Calibration(gemm_tflops=0.07, model_tflops=0.08, layer_overhead_s=5e-3, microbatch_overhead_s=0.0,
                      optimizer_bytes_per_s=1.2e10, cores=2,
                      alltoall={4: LinkFit(1e-3, 0.9), 8: LinkFit(5e-4, 0.6)},
                      allreduce={4: LinkFit(2e-3, 0.8), 8: LinkFit(2e-3, 0.85)}, measured="now")
    path = str(tmp_path / "cal.json")
    cal.save(path)
    assert Calibration.load(path) == cal
    cluster = Cluster.from_calibration(cal, nodes=1, gpus_per_node=8, memory_gib=4.0)
    assert cluster.peak_tflops == 0.08 and cluster.efficiency == 1.0  # the model's own measured rate
    assert cluster.intra() == LinkFit(5e-4, 0.6) and cluster.intra_allreduce == LinkFit(2e-3, 0.85)
    assert cluster.share == 0.25 and not cluster.overlap  # 8 ranks on 2 cores
    assert Cluster.from_calibration(cal, 1, 5, 4.0).intra() == LinkFit(1e-3, 0.9)  # nearest measured W


def test_expert_load_file_slows_the_ep_layouts(tmp_path, capsys):
    """A skewed measured load (the rebalancer's format) makes the busiest EP rank compute more and
    sends more rows to it; the CLI takes the file."""
    base = parse_args(TINY)
    skewed = [[40, 20, 10, 5, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 50]]
    cluster = tiny_cluster()
    lay = layout(ep=4)
    cfg = lay.apply(base)
    load = expert_load_by_layer(cfg, skewed)
    uniform = busiest(cfg, lay, cluster, None, memory_per_rank(cfg, 4).optimizer)
    measured = busiest(cfg, lay, cluster, skewed, memory_per_rank(cfg, 4, load).optimizer)
    assert measured.compute_s > uniform.compute_s
    assert measured.exchange_intra_s > uniform.exchange_intra_s
    path = tmp_path / "loads.json"
    path.write_text(json.dumps(skewed))
    assert plan_parallel.main(TINY + ["--expert-load", str(path), "--top", "1", "--json",
                                      "--max-evaluations", "30"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1
