"""tools/convert_checkpoint.py: the published HF OpenMoE layout (written here from a tiny config, as
pytorch_model*.bin shards) converts both ways with identical tensors and loads in megamoe; bad input is
one line; converting a many-shard checkpoint needs memory near one shard, not the model."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megamoe.training.hf_interop import hf_to_megamoe, iter_hf_tensors
from tests.harness import train_losses

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
L, H, HEADS, D, FFN, E, V, INTERVAL = 4, 32, 4, 8, 48, 4, 300, 2

# ColossalAI's OpenMoE config.json (a LlamaConfig with set_openmoe_args' fields), tiny
OPENMOE_CONFIG = {
    "architectures": ["OpenMoeForCausalLM"],
    "model_type": "llama",
    "hidden_size": H,
    "intermediate_size": FFN,
    "num_hidden_layers": L,
    "num_attention_heads": HEADS,
    "num_key_value_heads": HEADS,
    "head_dim": D,
    "vocab_size": V,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 64,
    "hidden_act": "swiglu",
    "num_experts": E,
    "moe_layer_interval": INTERVAL,
    "router_topk": 2,
    "router_capacity_factor_train": 1.25,
    "router_capacity_factor_eval": 2.0,
    "router_min_capacity": 4,
    "router_drop_tks": True,
    "router_aux_loss_factor": 0.01,
    "router_z_loss_factor": 0.0001,
    "z_loss_factor": 0.0001,
    "mlp_gated": True,
    "tie_word_embeddings": False,
    "pretraining_tp": 1,
    "bos_token_id": 2,
    "eos_token_id": 1,
}


def openmoe_state() -> dict[str, torch.Tensor]:
    """Every tensor of OpenMoeForCausalLM with its published name and shape (random values)."""
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    sd = {"model.embed_tokens.weight": t(V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "self_attn.q_proj.weight": t(HEADS * D, H),
                p + "self_attn.k_proj.weight": t(HEADS * D, H),
                p + "self_attn.v_proj.weight": t(HEADS * D, H),
                p + "self_attn.o_proj.weight": t(H, HEADS * D),
                p + "input_layernorm.weight": t(H),
                p + "post_attention_layernorm.weight": t(H),
            }
        )
        dense = "extra_mlp." if (i + 1) % INTERVAL == 0 else "mlp."
        sd.update(
            {
                p + dense + "gate_proj.weight": t(2 * FFN, H),
                p + dense + "up_proj.weight": t(FFN, H),
                p + dense + "down_proj.weight": t(H, FFN),
            }
        )
        if (i + 1) % INTERVAL == 0:  # SparseMLP: router + stacked experts, then the extra dense MLP
            sd.update(
                {
                    p + "mlp.gate_weight": t(E, H),
                    p + "mlp.experts.wi_gate": t(E, H, 2 * FFN),
                    p + "mlp.experts.wi_up": t(E, H, FFN),
                    p + "mlp.experts.wo": t(E, FFN, H),
                    p + "pre_extra_mlp_layernorm.weight": t(H),
                }
            )
    sd.update({"model.norm.weight": t(H), "lm_head.weight": t(V, H)})
    return sd


def write_bin_checkpoint(path, state: dict[str, torch.Tensor], shards: int = 3) -> None:
    """pytorch_model-0000k-of-0000n.bin shards and their index, as transformers 4.x saved them."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(OPENMOE_CONFIG))
    names, weight_map = list(state), {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[k::shards]}
        torch.save(part, path / file)
        weight_map.update({n: file for n in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _tool_main():
    spec = importlib.util.spec_from_file_location(
        "tools_convert_checkpoint", os.path.join(ROOT, "tools", "convert_checkpoint.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def one_line_error(capsys, *args: str) -> str:
    """Run the tool in this process (no interpreter start per case): exit 2 and one stderr line."""
    rc = _tool_main()([str(a) for a in args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def openmoe(tmp_path_factory):
    d = tmp_path_factory.mktemp("openmoe")
    state = openmoe_state()
    write_bin_checkpoint(d / "hf", state)
    hf_to_megamoe(str(d / "hf"), str(d / "ckpt"))
    return d, state


def test_openmoe_converts_both_ways_with_identical_tensors(openmoe, tmp_path):
    d, state = openmoe
    assert (
        convert(
            "--direction",
            "megamoe-to-hf",
            "--input",
            d / "ckpt",
            "--output",
            tmp_path / "hf",
            "--max-shard-size-mb",
            "1",
        ).returncode
        == 0
    )
    back = dict(iter_hf_tensors(str(tmp_path / "hf")))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[name], tensor) for name, tensor in state.items())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: config[k] for k in OPENMOE_CONFIG} == OPENMOE_CONFIG  # every published field kept
    meta = json.loads((d / "ckpt" / "iter_0000000" / "meta.json").read_text())
    assert meta["iteration"] == 0 and meta["config"]["moe"]["layer_freq"] == INTERVAL


def test_converted_openmoe_loads_and_trains_in_megamoe(openmoe):
    """--load with --finetune under TP2 x EP2: the weights are the HF tensors (logical expert 3 of
    layer 1 is slot 3 of the stacked HF tensor), and training starts at iteration 1."""
    d, state = openmoe
    from megamoe.arguments import parse_args
    from megamoe.model.openmoe import OpenMoEModel
    from megamoe.parallel.mesh import ParallelMesh
    from megamoe.training.checkpoint import load_checkpoint

    shape = [
        "--num-layers",
        L,
        "--hidden-size",
        H,
        "--num-attention-heads",
        HEADS,
        "--kv-channels",
        D,
        "--ffn-hidden-size",
        FFN,
        "--num-experts",
        E,
        "--moe-layer-freq",
        INTERVAL,
        "--vocab-size",
        V,
        "--seq-length",
        16,
        "--mock-data",
        "--moe-capacity-factor",
        "1.25",
    ]
    cfg = parse_args([str(a) for a in shape])
    model = OpenMoEModel(cfg)
    model.init_weights(0)  # the vocabulary padding rows, which no checkpoint holds
    load_checkpoint(str(d / "ckpt"), model, None, ParallelMesh(world_size=1, rank=0), cfg)
    assert torch.equal(
        model.layers["1"].mlp.experts.wi_gate[3], state["model.layers.1.mlp.experts.wi_gate"][3]
    )
    assert torch.equal(model.lm_head.weight[:V], state["lm_head.weight"])
    records = train_losses(
        4,
        [str(a) for a in shape]
        + [
            "--tensor-model-parallel-size",
            "2",
            "--expert-model-parallel-size",
            "2",
            "--load",
            str(d / "ckpt"),
            "--finetune",
            "--train-iters",
            "2",
            "--global-batch-size",
            "4",
            "--micro-batch-size",
            "2",
            "--log-interval",
            "1000",
            "--eval-interval",
            "100000",
        ],
        base_args=[],
    )
    assert [r["iteration"] for r in records] == [1, 2]


def test_bad_input_is_one_line(openmoe, tmp_path, capsys):
    d, state = openmoe
    bad = tmp_path / "llama"
    write_bin_checkpoint(bad, {"model.embed_tokens.weight": torch.zeros(2, 2)}, shards=1)
    (bad / "config.json").write_text(json.dumps({**OPENMOE_CONFIG, "architectures": ["LlamaForCausalLM"]}))
    err = one_line_error(capsys, "--direction", "hf-to-megamoe", "--input", bad, "--output", tmp_path / "o")
    assert "architecture 'LlamaForCausalLM' is not supported" in err

    missing = tmp_path / "missing"
    write_bin_checkpoint(missing, state)
    os.remove(missing / "pytorch_model-00002-of-00003.bin")
    err = one_line_error(
        capsys, "--direction", "hf-to-megamoe", "--input", missing, "--output", tmp_path / "o"
    )
    assert "shard pytorch_model-00002-of-00003.bin listed in pytorch_model.bin.index.json is missing" in err

    wrong = tmp_path / "wrong"
    write_bin_checkpoint(wrong, state)
    (wrong / "config.json").write_text(json.dumps({**OPENMOE_CONFIG, "intermediate_size": 2 * FFN}))
    err = one_line_error(capsys, "--direction", "hf-to-megamoe", "--input", wrong, "--output", tmp_path / "o")
    assert "has shape" in err and "config.json implies" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()  # nothing half-written

    unsafe = tmp_path / "unsafe"
    write_bin_checkpoint(unsafe, state, shards=1)
    torch.save(
        {"model.norm.weight": torch.zeros(H), "x": datetime.timedelta(1)},
        unsafe / "pytorch_model-00001-of-00001.bin",
    )
    err = one_line_error(
        capsys, "--direction", "hf-to-megamoe", "--input", unsafe, "--output", tmp_path / "o"
    )
    assert "is unreadable" in err  # weights_only refused the pickled object; nothing ran

    padded = tmp_path / "padded"  # a megamoe checkpoint of a version that saved the padded vocabulary
    import shutil

    shutil.copytree(d / "ckpt", padded)
    for file in (padded / "iter_0000000").glob("rank_*.safetensors"):
        tensors = load_file(file)
        if "weight/embed_tokens.weight@0,0" in tensors:
            tensors["weight/embed_tokens.weight@0,0"] = torch.cat(
                [tensors["weight/embed_tokens.weight@0,0"], torch.zeros(384 - V, H)]
            )
            save_file(tensors, file)
    err = one_line_error(
        capsys, "--direction", "megamoe-to-hf", "--input", padded, "--output", tmp_path / "o"
    )
    assert "saved with a padded vocabulary (embed_tokens.weight has 384 rows, the vocabulary 300)" in err

    err = one_line_error(capsys, "--direction", "hf-to-megamoe", "--input", d / "hf", "--output", d / "ckpt")
    assert "already holds a checkpoint; pass --overwrite" in err


MEMORY_CHILD = r"""
import json, sys
from megamoe.training.hf_interop import hf_to_megamoe, megamoe_to_hf


def rss_kib(field):  # VmRSS: now; VmHWM: the peak since the last reset
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_growth(run):
    base = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    run()
    return rss_kib("VmHWM") - base


src, out = sys.argv[1], sys.argv[2]
hf_to_megamoe(src + "/warm", out + "/warm")  # imports and first-use allocations, not counted
megamoe_to_hf(out + "/warm", out + "/warm_hf")
grew_import = peak_growth(lambda: hf_to_megamoe(src + "/big", out + "/ckpt"))
grew_export = peak_growth(lambda: megamoe_to_hf(out + "/ckpt", out + "/hf", max_shard_bytes=4 << 20))
print(json.dumps({"import_kib": grew_import, "export_kib": grew_export}))
"""


def _mixtral_shards(path, hidden: int, ffn: int, layers: int, experts: int, shard_bytes: int) -> int:
    """A MixtralForCausalLM checkpoint (published names) cut into safetensors shards of ~shard_bytes;
    returns the largest shard's size."""
    vocab, kv = 1024, hidden // 2
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["MixtralForCausalLM"],
                "model_type": "mixtral",
                "hidden_size": hidden,
                "intermediate_size": ffn,
                "num_hidden_layers": layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": hidden // 4,
                "vocab_size": vocab,
                "num_local_experts": experts,
                "num_experts_per_tok": 2,
                "rms_norm_eps": 1e-5,
                "rope_theta": 1e6,
                "max_position_embeddings": 64,
                "tie_word_embeddings": False,
                "sliding_window": None,
            }
        )
    )
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "block_sparse_moe.gate.weight": (experts, hidden),
            }
        )
        for x in range(experts):
            q = f"{p}block_sparse_moe.experts.{x}."
            shapes.update(
                {
                    q + "w1.weight": (ffn, hidden),
                    q + "w3.weight": (ffn, hidden),
                    q + "w2.weight": (hidden, ffn),
                }
            )
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = torch.randn(shape)
        size += current[name].numel() * 4
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    weight_map, largest = {}, 0
    for k, part in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, path / file)
        weight_map.update({n: file for n in part})
        largest = max(largest, os.path.getsize(path / file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return largest


def test_conversion_memory_stays_near_one_shard(tmp_path):
    """~64 MiB of weights in ~4 MiB shards: peak RSS grows by about one shard, not by the model (each
    direction, measured with getrusage in a fresh process)."""
    _mixtral_shards(tmp_path / "warm", hidden=32, ffn=32, layers=1, experts=2, shard_bytes=1 << 20)
    largest = _mixtral_shards(tmp_path / "big", hidden=256, ffn=512, layers=4, experts=8, shard_bytes=4 << 20)
    total = sum(os.path.getsize(f) for f in (tmp_path / "big").glob("*.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(tmp_path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr
    grew = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"\nconversion of {total / 2**20:.1f} MiB in shards of <= {largest / 2**20:.1f} MiB: peak RSS "
        f"+{grew['import_kib'] / 1024:.1f} MiB (hf-to-megamoe), +{grew['export_kib'] / 1024:.1f} MiB "
        "(megamoe-to-hf)"
    )
    assert total > 12 * largest
    assert grew["import_kib"] * 1024 < 2.5 * largest and grew["export_kib"] * 1024 < 2.5 * largest
