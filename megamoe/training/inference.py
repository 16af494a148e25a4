"""Logits of a checkpoint for a batch of token ids, under any launch layout (tools/forward.py).

The checkpoint carries its model config (meta.json), so only the layout comes from flags. Every rank
runs the whole batch (data-parallel replicas repeat it); pipeline stages hand the residual stream on
with send/recv in virtual-stage order; the last stage gathers the vocabulary shards over TP and cuts
the padding columns, so the result is [batch, seq, vocab] whatever the layout.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist

from megamoe.config import Config, ConfigError, ParallelConfig, TrainConfig, stage_layer_ranges
from megamoe.parallel.mesh import ParallelMesh
from megamoe.params import cast_params
from megamoe.training.checkpoint import CheckpointError, load_checkpoint, read_meta, resolve_checkpoint


def checkpoint_config(load: str, parallel: ParallelConfig, tokens_shape: tuple[int, int], world_size: int,
                      bf16: bool = False) -> Config:
    """The run config for a forward of ``tokens_shape`` [b, s]: the checkpoint's model, this layout."""
    from megamoe.training.hf_interop import config_from_meta

    path = resolve_checkpoint(load)
    if path is None:
        raise CheckpointError(f"--load {load} holds no checkpoint (no 'latest' and no meta.json)")
    saved = config_from_meta(read_meta(path))
    b, s = tokens_shape
    dp = max(1, world_size // (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size))
    cfg = saved.replace(model=dataclasses.replace(saved.model, seq_length=s), parallel=parallel,
                        train=TrainConfig(micro_batch_size=b, global_batch_size=b * dp, bf16=bf16, load=load))
    return cfg.validate(world_size)


def check_tokens(tokens: np.ndarray, vocab_size: int, where: str) -> torch.Tensor:
    """[b, s] integer ids inside the vocabulary, as int64."""
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
        raise ConfigError(f"{where}: expected a [batch, seq] integer array, got {tokens.dtype} of shape "
                          f"{list(tokens.shape)}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ConfigError(f"{where}: token ids span [{low}, {high}], outside the model's vocabulary "
                          f"[0, {vocab_size}); tokenize with the model's tokenizer")
    return torch.from_numpy(tokens.astype(np.int64))


@torch.no_grad()
def forward_logits(cfg: Config, mesh: ParallelMesh, tokens: torch.Tensor,
                   device: torch.device | None = None) -> np.ndarray | None:
    """fp32 logits [b, s, vocab] on the last pipeline stage's ranks (None on the others)."""
    from megamoe.training.run import build_stage_model

    device = device or torch.device("cpu")
    model = build_stage_model(cfg, mesh)
    for p in model.parameters():  # padding rows are never loaded: keep them finite
        p.data.zero_()
    model.to(device)
    load_checkpoint(cfg.train.load, model, None, mesh, cfg)
    if cfg.train.bf16:
        cast_params(model, torch.bfloat16)
    model.eval()
    tokens = tokens.to(device)
    p = cfg.parallel
    ranges = stage_layer_ranges(cfg.model.num_layers, mesh.pp, p.virtual_stages(cfg.model.num_layers),
                                p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers)
    b, s = tokens.shape
    shape = (b, s // mesh.tp if mesh.sequence_parallel else s, cfg.model.hidden_size)  # residual stream
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    ring = mesh.members.get("pp", [mesh.rank])
    x, logits = None, None
    for v in range(len(ranges)):  # virtual stage v runs on pipeline rank v % PP, chunk v // PP
        if v % mesh.pp != mesh.pp_rank:
            continue
        chunk = model.chunks[v // mesh.pp]
        if chunk.pre_process:
            x = chunk.embed_tokens(tokens)
        elif mesh.pp > 1:
            x = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(x, ring[(v - 1) % mesh.pp])
        x = chunk.decode(x)
        if chunk.post_process:
            logits = chunk.logits(x)  # [b, s, V_padded / tp]
        elif mesh.pp > 1:
            dist.send(x.contiguous(), ring[(v + 1) % mesh.pp])
    if logits is None:
        return None
    if mesh.tp > 1:
        shards = [torch.empty_like(logits) for _ in range(mesh.tp)]
        dist.all_gather(shards, logits.contiguous(), group=mesh.groups["tp"])
        logits = torch.cat(shards, dim=-1)
    return logits[..., :cfg.model.vocab_size].float().cpu().numpy()
