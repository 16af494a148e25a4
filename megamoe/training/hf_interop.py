"""Hugging Face checkpoints <-> megamoe checkpoints, streamed one shard (one tensor) at a time.

Two families (docs/ARCHITECTURE.md, "Hugging Face interop"):

- ``MixtralForCausalLM`` (the published layout, which ``save_pretrained`` still writes):
  ``model.layers.L.block_sparse_moe.gate.weight`` [E, H] is megamoe's ``layers.L.mlp.gate_weight``;
  ``...experts.X.w1.weight`` / ``w3`` [I, H] and ``w2`` [H, I] are megamoe's ``layers.L.mlp.experts.X.
  wi_gate`` / ``wi_up`` [H, I] and ``wo`` [I, H] transposed (megamoe keeps x @ w layouts for its grouped
  GEMMs). Everything else is megamoe's name under ``model.`` (``lm_head.weight`` as is).
- ``OpenMoeForCausalLM`` (ColossalAI's port, published as OrionZheng/openmoe-*): megamoe already uses
  its names; only its stacked experts ``model.layers.L.mlp.experts.wi_gate`` [E, H, 2I] are one
  logical tensor per expert in megamoe (``layers.L.mlp.experts.X.wi_gate`` [H, 2I]).

HF -> megamoe writes one megamoe file per input shard (``rank_NNNNN.safetensors``, every tensor whole,
keyed by its logical name), so memory stays near one shard; ``--load`` reads it under any layout (the
loader takes each region it needs from whichever file holds it). The checkpoint is iteration 0 with no
optimizer state: training from it starts fresh. megamoe -> HF reads the logical tensors one at a time
from a checkpoint saved under any layout and writes config.json plus safetensors shards.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megamoe.config import Config, ConfigError, DataConfig, ModelConfig, MoEConfig
from megamoe.training.checkpoint import FORMAT_VERSION, CheckpointError, read_meta, resolve_checkpoint
from megamoe.training.safetensors_stream import SafetensorsReader, StreamingSafetensors

ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "OpenMoeForCausalLM": "openmoe"}
_MIXTRAL_EXPERT = {"wi_gate": "w1", "wi_up": "w3", "wo": "w2"}


class ConvertError(RuntimeError):
    """Input that cannot be converted; the message is one line naming the problem and the fix."""


# --------------------------------------------------------------------------------------------------
# config.json <-> megamoe Config


def _field(hf: dict[str, Any], path: str, *names: str, default: Any = dataclasses.MISSING) -> Any:
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    if default is dataclasses.MISSING:
        raise ConvertError(f"{path}: config.json lacks {names[0]}; it is not a complete "
                           "Hugging Face config")
    return default


def _rope_theta(hf: dict[str, Any], default: float) -> float:
    rope = hf.get("rope_parameters") or {}  # transformers 5 nests it; 4.x has it at the top level
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ConvertError("config.json asks for scaled rotary embeddings (rope_scaling); megamoe has "
                           "plain RoPE only")
    return float(rope.get("rope_theta") or hf.get("rope_theta") or default)


def config_from_hf(hf: dict[str, Any], path: str) -> Config:
    """The megamoe Config of a Hugging Face config.json (Mixtral or OpenMoE)."""
    arch = (hf.get("architectures") or [None])[0]
    family = ARCHITECTURES.get(arch)
    if family is None:
        raise ConvertError(f"{path}: architecture {arch!r} is not supported; convert one of "
                           f"{', '.join(ARCHITECTURES)}")
    if hf.get("tie_word_embeddings"):
        raise ConvertError(f"{path}: tie_word_embeddings is true; megamoe's LM head is untied")
    heads = int(_field(hf, path, "num_attention_heads"))
    hidden = int(_field(hf, path, "hidden_size"))
    kv = int(_field(hf, path, "num_key_value_heads", default=heads))
    model = dict(num_layers=int(_field(hf, path, "num_hidden_layers")), hidden_size=hidden,
                 num_attention_heads=heads,
                 kv_channels=int(_field(hf, path, "head_dim", default=hidden // heads)),
                 ffn_hidden_size=int(_field(hf, path, "intermediate_size")),
                 vocab_size=int(_field(hf, path, "vocab_size")),
                 seq_length=int(_field(hf, path, "max_position_embeddings", default=2048)),
                 norm_epsilon=float(_field(hf, path, "rms_norm_eps", "layer_norm_epsilon", default=1e-6)),
                 model_family=family, group_query_attention=kv != heads or family == "mixtral",
                 num_query_groups=kv if kv != heads or family == "mixtral" else None)
    if family == "mixtral":
        if hf.get("sliding_window") is not None:
            raise ConvertError(f"{path}: sliding_window {hf['sliding_window']} is set; megamoe attends to "
                               "the whole sequence (set it to null if the model was trained without it)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConvertError(f"{path}: hidden_act {hf['hidden_act']!r}; Mixtral experts here are silu")
        model.update(rotary_base=_rope_theta(hf, 1e6), output_z_loss_coeff=0.0)
        moe = dict(num_experts=int(_field(hf, path, "num_local_experts")),
                   router_topk=int(_field(hf, path, "num_experts_per_tok")), layer_freq=1,
                   aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.02)), z_loss_coeff=0.0)
    else:
        model.update(rotary_base=_rope_theta(hf, 1e4),
                     output_z_loss_coeff=float(hf.get("z_loss_factor", 1e-4)))
        drop = hf.get("router_drop_tks", True)
        moe = dict(num_experts=int(_field(hf, path, "num_experts")),
                   router_topk=int(_field(hf, path, "router_topk", "topk", default=2)),
                   layer_freq=int(_field(hf, path, "moe_layer_interval")),
                   capacity_factor=hf.get("router_capacity_factor_train", 1.25) if drop else None,
                   eval_capacity_factor=hf.get("router_capacity_factor_eval", 2.0) if drop else None,
                   min_capacity=int(hf.get("router_min_capacity", 4)),
                   aux_loss_coeff=float(hf.get("router_aux_loss_factor", 0.01)),
                   z_loss_coeff=float(hf.get("router_z_loss_factor", 1e-4)))
    try:
        return Config(model=ModelConfig(**model), moe=MoEConfig(**moe),
                      data=DataConfig(mock_data=True)).validate(world_size=None)
    except ConfigError as e:
        raise ConvertError(f"{path}: config.json gives a model megamoe cannot build ({e})") from None


def config_from_meta(meta: dict[str, Any]) -> Config:
    """The model of a megamoe checkpoint's meta.json (fields of other megamoe versions ignored)."""
    saved = meta["config"]

    def build(cls: type, values: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})

    return Config(model=build(ModelConfig, saved["model"]), moe=build(MoEConfig, saved["moe"]),
                  data=DataConfig(mock_data=True))


def hf_config(cfg: Config, dtype: torch.dtype, original: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for ``cfg``: the original one (converted from HF) with megamoe's values written over
    it, so token ids and other fields megamoe does not model survive the round trip."""
    m, moe = cfg.model, cfg.moe
    out = dict(original or {})
    out.update(hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
               num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
               num_key_value_heads=m.kv_heads, head_dim=m.kv_channels, vocab_size=m.vocab_size,
               rms_norm_eps=m.norm_epsilon, tie_word_embeddings=False,
               max_position_embeddings=out.get("max_position_embeddings", m.seq_length))
    out.setdefault("torch_dtype", str(dtype).removeprefix("torch."))
    if "rope_parameters" in out:
        out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": m.rotary_base}
    else:
        out["rope_theta"] = m.rotary_base
    if m.model_family == "mixtral":
        out.update(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_act="silu",
                   num_local_experts=moe.num_experts, num_experts_per_tok=moe.router_topk,
                   router_aux_loss_coef=moe.aux_loss_coeff, sliding_window=None)
    else:  # ColossalAI's OpenMoE: a LlamaConfig with the MoE arguments set_openmoe_args adds
        out.update(architectures=["OpenMoeForCausalLM"], model_type="llama", hidden_act="swiglu",
                   num_experts=moe.num_experts, moe_layer_interval=moe.layer_freq,
                   router_topk=moe.router_topk,
                   router_capacity_factor_train=moe.capacity_factor or 1.25,
                   router_capacity_factor_eval=moe.eval_capacity_factor or 2.0,
                   router_min_capacity=moe.min_capacity, router_drop_tks=moe.capacity_factor is not None,
                   router_aux_loss_factor=moe.aux_loss_coeff, router_z_loss_factor=moe.z_loss_coeff,
                   z_loss_factor=m.output_z_loss_coeff, mlp_gated=True)
    return out


# --------------------------------------------------------------------------------------------------
# Tensor names and shapes


@dataclass(frozen=True)
class HFSlot:
    """Where a megamoe logical tensor lives in the HF checkpoint: tensor ``name``, slot ``expert`` of
    its first dimension (OpenMoE's stacked experts; None: the whole tensor), ``transpose``d (Mixtral's
    expert Linear weights)."""

    name: str
    expert: int | None = None
    transpose: bool = False


_EXPERT_KEY = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(wi_gate|wi_up|wo)$")


def hf_slot(key: str, family: str) -> HFSlot:
    """The HF home of megamoe logical tensor ``key``."""
    if key == "lm_head.weight":
        return HFSlot(key)
    expert = _EXPERT_KEY.match(key)
    if family == "mixtral":
        if expert:
            layer, x, leaf = expert.groups()
            return HFSlot(f"model.layers.{layer}.block_sparse_moe.experts.{x}.{_MIXTRAL_EXPERT[leaf]}.weight",
                          transpose=True)
        if key.endswith(".mlp.gate_weight"):
            return HFSlot("model." + key.replace(".mlp.gate_weight", ".block_sparse_moe.gate.weight"))
    elif expert:
        layer, x, leaf = expert.groups()
        return HFSlot(f"model.layers.{layer}.mlp.experts.{leaf}", expert=int(x))
    return HFSlot("model." + key)


def logical_tensors(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every logical tensor of the model (megamoe's checkpoint keys) and its shape, in model order,
    from a model built on the meta device (no memory), so names always follow the model code."""
    from megamoe.model.openmoe import OpenMoEModel
    from megamoe.training.checkpoint import param_pieces

    # no vocabulary padding: the logical tensors never include it, and the meta device cannot
    # evaluate the mask that separates padding rows
    unpadded = cfg.replace(model=dataclasses.replace(cfg.model, make_vocab_size_divisible_by=1))
    with torch.device("meta"):
        model = OpenMoEModel(unpadded)
    return {piece.key: piece.full for name, p in model.named_parameters() for piece in param_pieces(name, p)}


def hf_layout(cfg: Config) -> dict[str, tuple[tuple[int, ...], list[tuple[str, HFSlot]]]]:
    """HF tensor name -> (its shape, [(megamoe key, slot)]), in model order."""
    family, out = cfg.model.model_family, {}
    for key, shape in logical_tensors(cfg).items():
        slot = hf_slot(key, family)
        hf_shape = tuple(reversed(shape)) if slot.transpose else shape
        if slot.expert is not None:
            hf_shape = (cfg.moe.num_experts, *shape)
        out.setdefault(slot.name, (hf_shape, []))[1].append((key, slot))
    return out


# --------------------------------------------------------------------------------------------------
# Reading HF shards


def hf_shards(directory: str) -> list[str]:
    """The weight files of an HF checkpoint directory, each checked to exist."""
    def listed(index: str) -> list[str]:
        try:
            with open(os.path.join(directory, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConvertError(f"{directory}/{index} is unreadable ({e}); restore the checkpoint's "
                               "index file") from None
        missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
        if missing:
            raise ConvertError(f"{directory}: shard {missing[0]} listed in {index} is missing "
                               f"({len(missing)} of {len(files)} shards); download every shard")
        return files

    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(directory, index)):
            return [os.path.join(directory, f) for f in listed(index)]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
    raise ConvertError(f"{directory} holds no model.safetensors, pytorch_model.bin or their index; point "
                       "--input at a Hugging Face checkpoint directory")


class _Shard:
    """One HF weight file: names, shapes and dtypes, and tensors on demand. safetensors are read tensor
    by tensor; a ``pytorch_model*.bin`` only through torch.load(weights_only=True) (no code runs),
    memory-mapped so that a shard is never copied whole."""

    def __init__(self, path: str) -> None:
        self.path, self._st, self._bin = path, None, None
        try:
            if path.endswith(".bin"):
                self._bin = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                if not isinstance(self._bin, dict):
                    raise ValueError("not a state dict")
                self.shapes = {k: tuple(v.shape) for k, v in self._bin.items()}
                self.dtypes = {k: v.dtype for k, v in self._bin.items()}
            else:
                self._st = SafetensorsReader(path)
                self.shapes, self.dtypes = self._st.shapes, self._st.dtypes
        except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConvertError(f"{path} is unreadable ({why}); download the shard again") from None

    def get(self, name: str) -> torch.Tensor:
        return self._bin[name] if self._bin is not None else self._st.get(name)

    def close(self) -> None:
        if self._st is not None:
            self._st.close()
        self._bin = None


# --------------------------------------------------------------------------------------------------
# HF -> megamoe


def _prepare_output(path: str, overwrite: bool, marker: str) -> str:
    """A fresh temporary directory beside ``path``; ``path`` must not hold an earlier result (``marker``
    file) unless ``overwrite``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConvertError(f"--output {path} is a file; pass a directory")
    if os.path.exists(os.path.join(path, marker)) and not overwrite:
        raise ConvertError(f"--output {path} already holds a checkpoint; pass --overwrite to replace it")
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _fsync_write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def hf_to_megamoe(src: str, dst: str, overwrite: bool = False) -> dict[str, Any]:
    """Convert the HF checkpoint directory ``src`` into a megamoe checkpoint at ``dst`` (``dst/latest``
    -> ``iter_0000000``). Returns a summary (tensors, shards, bytes)."""
    config_path = os.path.join(src, "config.json")
    try:
        with open(config_path) as f:
            original = json.load(f)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{config_path} is unreadable ({e}); --input must be a Hugging Face "
                           "checkpoint directory") from None
    if not isinstance(original, dict):
        raise ConvertError(f"{config_path} is not a JSON object")
    cfg = config_from_hf(original, config_path)
    layout = hf_layout(cfg)
    shards = hf_shards(src)
    tmp = _prepare_output(dst, overwrite, "latest")
    try:
        written, total = _convert_shards(shards, layout, os.path.join(tmp, "iter_0000000"))
        missing = [key for _, keys in layout.values() for key, _ in keys if key not in written]
        if missing:
            raise ConvertError(f"{src}: no shard holds {hf_slot(missing[0], cfg.model.model_family).name} "
                               f"({len(missing)} tensors missing); the checkpoint is incomplete")
        meta = {"format": FORMAT_VERSION, "iteration": 0, "consumed_samples": 0, "adam_step": 0.0,
                "world_size": 1, "layout": f"converted from Hugging Face {original['architectures'][0]}",
                "files": len(shards), "config": dataclasses.asdict(cfg), "hf_config": original}
        _fsync_write_json(os.path.join(tmp, "iter_0000000", "meta.json"), meta)
        with open(os.path.join(tmp, "latest"), "w") as f:
            f.write("iter_0000000\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, dst)
    return {"tensors": len(written), "shards": len(shards), "bytes": total}


def _replace_dir(tmp: str, dst: str) -> None:
    """Put the complete ``tmp`` at ``dst`` (an earlier result moved aside first, removed last)."""
    old = dst.rstrip("/") + ".old"
    if os.path.isdir(dst):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def _convert_shards(shards: list[str], layout: dict, iter_dir: str) -> tuple[set[str], int]:
    """One megamoe file per HF shard; returns the megamoe keys written and the bytes."""
    os.makedirs(iter_dir)
    written: set[str] = set()
    total = 0
    for rank, path in enumerate(shards):
        out = os.path.join(iter_dir, f"rank_{rank:05d}.safetensors")
        total += _convert_shard(_Shard(path), layout, out, written)
    return written, total


def _convert_shard(shard: _Shard, layout: dict, out_path: str, written: set[str]) -> int:
    """Write the megamoe pieces of every tensor of one HF shard to ``out_path``; returns bytes."""
    try:
        entries: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        plan = []
        for name, shape in shard.shapes.items():
            if name.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved; recomputed
                continue
            if name not in layout:
                raise ConvertError(f"{shard.path}: tensor {name} is not part of this model; the shards do "
                                   "not match config.json")
            want, keys = layout[name]
            if shape != want:
                raise ConvertError(f"{shard.path}: {name} has shape {list(shape)}, config.json implies "
                                   f"{list(want)}; the shards do not match config.json")
            for key, slot in keys:
                piece_shape = want[1:] if slot.expert is not None else \
                    (tuple(reversed(want)) if slot.transpose else want)
                entry = f"weight/{key}@{','.join('0' * len(piece_shape))}"
                entries[entry] = (shard.dtypes[name], piece_shape)
                plan.append((name, slot, entry, key))
        nbytes = 0
        with StreamingSafetensors(out_path, entries, {"format": str(FORMAT_VERSION)}) as out:
            current, tensor = None, None
            for name, slot, entry, key in plan:
                if name != current:  # one HF tensor in memory at a time
                    current, tensor = name, shard.get(name)
                piece = tensor[slot.expert] if slot.expert is not None else tensor
                piece = piece.t() if slot.transpose else piece
                out.write(entry, piece.contiguous())
                nbytes += piece.numel() * piece.element_size()
                written.add(key)
        return nbytes
    finally:
        shard.close()


# --------------------------------------------------------------------------------------------------
# megamoe -> HF


class _Pieces:
    """The weight pieces of a megamoe checkpoint saved under any layout, read tensor by tensor."""

    def __init__(self, path: str, files: int) -> None:
        self.readers: list[SafetensorsReader] = []
        self.pieces: dict[str, list[tuple[SafetensorsReader, str, tuple[int, ...]]]] = {}
        for rank in range(files):
            file = os.path.join(path, f"rank_{rank:05d}.safetensors")
            try:
                reader = SafetensorsReader(file)
            except FileNotFoundError:
                self.close()
                raise ConvertError(f"checkpoint file {file} is missing; the checkpoint is "
                                   "incomplete") from None
            except ValueError as e:
                self.close()
                raise ConvertError(f"checkpoint file {file} is corrupt ({e})") from None
            self.readers.append(reader)
            for entry in reader.shapes:
                if entry.startswith("weight/") and "@" in entry:
                    key, offset = entry[len("weight/"):].rsplit("@", 1)
                    self.pieces.setdefault(key, []).append(
                        (reader, entry, tuple(int(x) for x in offset.split(",") if x)))

    def extent(self, key: str) -> tuple[int, ...] | None:
        """The shape the saved pieces of ``key`` span (None: not saved)."""
        found = self.pieces.get(key)
        if not found:
            return None
        return tuple(max(off[d] + reader.shapes[entry][d] for reader, entry, off in found)
                     for d in range(len(found[0][2])))

    def dtype(self, key: str) -> torch.dtype:
        reader, entry, _ = self.pieces[key][0]
        return reader.dtypes[entry]

    def read(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Logical tensor ``key`` [shape] assembled from its pieces, in the dtype it was saved in."""
        found = self.pieces[key]
        out = torch.empty(shape, dtype=found[0][0].dtypes[found[0][1]])
        for reader, entry, offset in found:
            region = tuple(slice(o, o + s) for o, s in zip(offset, reader.shapes[entry]))
            out[region] = reader.get(entry)
        return out

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def megamoe_to_hf(src: str, dst: str, overwrite: bool = False, max_shard_bytes: int = 5 << 30,
                  ) -> dict[str, Any]:
    """Export the megamoe checkpoint ``src`` (a --save directory or an iter_* directory) as an HF
    checkpoint at ``dst``: config.json and model[-0000i-of-0000n].safetensors (+ index)."""
    try:
        path = resolve_checkpoint(src)
        if path is None:
            raise ConvertError(f"{src} holds no megamoe checkpoint (no 'latest' and no meta.json)")
        meta = read_meta(path)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    try:
        cfg = config_from_meta(meta)
    except (TypeError, ValueError, KeyError) as e:
        raise ConvertError(f"{path}/meta.json has a model config this megamoe cannot read ({e})") from None
    layout = hf_layout(cfg)
    shapes = logical_tensors(cfg)
    pieces = _Pieces(path, int(meta["files"]))
    tmp = None
    try:
        _check_saved_shapes(pieces, shapes, cfg, path)
        sizes = {name: math.prod(shape) * pieces.dtype(keys[0][0]).itemsize
                 for name, (shape, keys) in layout.items()}
        tmp = _prepare_output(dst, overwrite, "config.json")
        files = _plan_hf_files(sizes, max_shard_bytes)
        weight_map = {}
        for file, names in files.items():
            _write_hf_file(os.path.join(tmp, file), names, layout, pieces)
            weight_map.update({name: file for name in names})
        if len(files) > 1:
            _fsync_write_json(os.path.join(tmp, "model.safetensors.index.json"),
                              {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
        dtype = pieces.dtype(next(iter(shapes)))
        _fsync_write_json(os.path.join(tmp, "config.json"), hf_config(cfg, dtype, meta.get("hf_config")))
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        pieces.close()
    _replace_dir(tmp, dst)
    return {"tensors": len(weight_map), "files": len(files)}


def _check_saved_shapes(pieces: _Pieces, shapes: dict[str, tuple[int, ...]], cfg: Config, path: str) -> None:
    for key, shape in shapes.items():
        saved = pieces.extent(key)
        if saved is None:
            raise ConvertError(f"checkpoint {path} lacks the weight {key} (saved by a different model?)")
        if saved == shape:
            continue
        if key in ("embed_tokens.weight", "lm_head.weight") and saved[0] > cfg.model.vocab_size:
            raise ConvertError(f"checkpoint {path} was saved with a padded vocabulary ({key} has {saved[0]} "
                               f"rows, the vocabulary {cfg.model.vocab_size}); resave it with this megamoe "
                               "(--load it and --save), which stores only the real rows")
        raise ConvertError(f"checkpoint {path}: {key} has shape {list(saved)}, its config implies "
                           f"{list(shape)}")


def _plan_hf_files(sizes: dict[str, int], max_bytes: int) -> dict[str, list[str]]:
    """HF tensor names per output file, in model order, each file at most ``max_bytes`` (one tensor
    larger than that gets a file of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def _write_hf_file(path: str, names: list[str], layout: dict, pieces: _Pieces) -> None:
    """One HF safetensors file, one logical tensor in memory at a time (experts of a stacked OpenMoE
    tensor go straight to their slot)."""
    entries = {name: (pieces.dtype(layout[name][1][0][0]), layout[name][0]) for name in names}
    with StreamingSafetensors(path, entries, {"format": "pt"}) as out:
        for name in names:
            shape, keys = layout[name]
            for key, slot in keys:
                piece_shape = shape[1:] if slot.expert is not None else \
                    (tuple(reversed(shape)) if slot.transpose else shape)
                tensor = pieces.read(key, piece_shape)
                if slot.transpose:
                    tensor = tensor.t()
                first = 0 if slot.expert is None else slot.expert * tensor.numel()
                values = tensor.contiguous().reshape(-1)
                out.write_range(name, first, values)


def iter_hf_tensors(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of an HF checkpoint directory, one at a time (tests compare round trips)."""
    for path in hf_shards(directory):
        shard = _Shard(path)
        try:
            for name in shard.shapes:
                yield name, shard.get(name)
        finally:
            shard.close()
