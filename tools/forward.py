#!/usr/bin/env python3
"""Logits of a megamoe checkpoint for a batch of token ids, under any launch layout.

    python tools/forward.py --load CKPT --tokens TOKENS.npy --output LOGITS.npy
    torchrun --nproc-per-node 8 tools/forward.py --load CKPT --tokens T.npy --output L.npy \\
        --tensor-model-parallel-size 2 --expert-model-parallel-size 2 --pipeline-model-parallel-size 2

TOKENS.npy: [batch, seq] integer ids. LOGITS.npy: [batch, seq, vocab] float32 over the true vocabulary
(no padding columns), computed in fp32 unless --bf16. The model comes from the checkpoint's meta.json;
only layout flags are taken (Megatron's names). This is also how a conversion is checked against
transformers (tools/convert_checkpoint.py).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megamoe.config import ConfigError, ParallelConfig  # noqa: E402
from megamoe.parallel.mesh import ParallelMesh, build_mesh, detect_launch, init_distributed  # noqa: E402
from megamoe.training.checkpoint import CheckpointError  # noqa: E402
from megamoe.training.inference import check_tokens, checkpoint_config, forward_logits  # noqa: E402

LAYOUT_FLAGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                "num_layers_per_virtual_pipeline_stage", "decoder_first_pipeline_num_layers",
                "decoder_last_pipeline_num_layers", "moe_ranks_per_node", "moe_alltoall_chunks")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, ParallelConfig]:
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="megamoe checkpoint (a --save directory or iter_*)")
    p.add_argument("--tokens", required=True, help="[batch, seq] integer ids (.npy)")
    p.add_argument("--output", required=True, help="[batch, seq, vocab] float32 logits (.npy)")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and compute (default: fp32)")
    for name in LAYOUT_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--moe-hierarchical-alltoall", action="store_true")
    p.add_argument("--distributed-backend", choices=("gloo", "nccl"), default=None)
    args = p.parse_args(argv)
    given = {name: getattr(args, name) for name in LAYOUT_FLAGS if getattr(args, name) is not None}
    parallel = ParallelConfig(**given, sequence_parallel=args.sequence_parallel,
                              moe_hierarchical_alltoall=args.moe_hierarchical_alltoall,
                              distributed_backend=args.distributed_backend)
    return args, parallel


def load_tokens(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--tokens {path} is not a readable .npy array ({e})") from None


def run(rank: int, world: int, argv: list[str], mesh: ParallelMesh | None = None,
        device: torch.device | None = None) -> np.ndarray | None:
    """One rank's part (process groups already initialised): the logits on the last stage's ranks,
    written to --output by the first of them."""
    args, parallel = parse(argv)
    raw = load_tokens(args.tokens)
    cfg = checkpoint_config(args.load, parallel, tuple(raw.shape[:2]) if raw.ndim == 2 else (1, 1), world,
                            args.bf16)
    tokens = check_tokens(raw, cfg.model.vocab_size, f"--tokens {args.tokens}")
    if mesh is None:
        mesh = ParallelMesh.from_config(cfg.parallel, world, rank)
        mesh.build_groups()
    logits = forward_logits(cfg, mesh, tokens, device)
    if logits is not None and mesh.tp_rank == 0 and mesh.dp_rank == 0:
        tmp = f"{args.output}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, logits)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.output)
    return logits


def main(argv: list[str] | None = None) -> int:
    try:
        info = detect_launch()
        args, parallel = parse(argv)
        backend = init_distributed(info, parallel.distributed_backend, parallel.distributed_timeout_minutes)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
        mesh = build_mesh(parallel, info)
        run(info.rank, info.world_size, argv if argv is not None else sys.argv[1:], mesh, device)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
