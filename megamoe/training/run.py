"""Compose a run: config -> launch/mesh -> model/optimizer/data -> resume -> Trainer.train().

``pretrain_openmoe.py`` is a thin wrapper over :func:`main`; tests call :func:`pretrain` directly
(inside already-initialised process groups) and compare the returned per-step records.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from megamoe import cpu_kernels
from megamoe.arguments import parse_args
from megamoe.config import Config, ConfigError, stage_layer_ranges
from megamoe.data.errors import DataError
from megamoe.data.mock import MockGPTDataset
from megamoe.data.sampler import SampleDataset
from megamoe.model.openmoe import OpenMoEModel, StageModel, count_parameters
from megamoe.moe.dispatcher import EPTopology, ExpertPlacement
from megamoe.moe.layer import MoEStats
from megamoe.parallel.mesh import ParallelMesh, build_mesh, detect_launch, init_distributed
from megamoe.parallel.optimizer import build_optimizer
from megamoe.parallel.pipeline import P2P
from megamoe.parallel.tensor import TPContext
from megamoe.params import cast_params
from megamoe.training.checkpoint import (
    CheckpointError,
    check_save_directory,
    load_checkpoint,
    saved_placement,
)
from megamoe.training.loop import Trainer, TrainingError
from megamoe.training.metrics import MetricsLogger, measure_peak_tflops
from megamoe.training.recompute import apply_recompute

# one table for every MoE layer, or one per global layer index; None: contiguous blocks
PlacementArg = ExpertPlacement | dict[int, ExpertPlacement] | None


def build_datasets(cfg: Config, mesh: ParallelMesh,
                   ) -> tuple[Config, SampleDataset, SampleDataset | None]:
    """Train/valid datasets; with a tokenizer, the model vocab follows the tokenizer's."""
    t, m = cfg.train, cfg.model
    n_train = t.train_iters * t.global_batch_size
    n_valid = (t.train_iters // t.eval_interval + 1) * t.eval_iters * t.global_batch_size
    if cfg.data.mock_data:
        return (cfg, MockGPTDataset(m.seq_length, m.vocab_size, t.seed, n_train),
                MockGPTDataset(m.seq_length, m.vocab_size, t.seed + 1, max(n_valid, 1)))
    from megamoe.data import build_train_valid_test_datasets
    from megamoe.data.tokenizer import build_tokenizer

    if cfg.data.tokenizer_model is None:
        raise ConfigError("--data-path needs --tokenizer-model (the SentencePiece .model or Hugging Face "
                          "tokenizer directory used to preprocess it)")
    tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    if tok.vocab_size != m.vocab_size:
        import dataclasses

        if mesh.rank == 0:  # the model's vocabulary follows the tokenizer's, whatever --vocab-size said
            print(f" > vocabulary {tok.vocab_size} from --tokenizer-model (not --vocab-size {m.vocab_size})",
                  flush=True)
        cfg = cfg.replace(model=dataclasses.replace(m, vocab_size=tok.vocab_size))
    barrier = dist.barrier if mesh.world_size > 1 else (lambda: None)
    train, valid, _ = build_train_valid_test_datasets(
        list(cfg.data.data_path), cfg.data.split, cfg.model.seq_length, t.seed,
        (n_train, n_valid, 0), cache_dir=cfg.data.data_cache_path,
        vocab_size=tok.vocab_size, is_rank0=mesh.rank == 0, barrier=barrier)
    if train is None:
        raise ConfigError(f"--split {cfg.data.split} leaves no training documents")
    return cfg, train, valid


def build_stage_model(cfg: Config, mesh: ParallelMesh, placement: PlacementArg = None) -> StageModel:
    """This rank's model chunks: virtual stage v = chunk * PP + pp_rank holds the v-th layer range;
    the first virtual stage owns the embedding, the last the final norm and LM head. ``placement``:
    one table for every MoE layer, or one per global layer index (a checkpoint's); None: contiguous."""
    p = cfg.parallel
    vp = p.virtual_stages(cfg.model.num_layers)
    ranges = stage_layer_ranges(cfg.model.num_layers, mesh.pp, vp, p.decoder_first_pipeline_num_layers,
                                p.decoder_last_pipeline_num_layers)
    tp, ep = TPContext.from_mesh(mesh), EPTopology.from_mesh(mesh, p.moe_hierarchical_alltoall)
    if isinstance(placement, ExpertPlacement):
        placement = {layer: placement for layer in range(cfg.model.num_layers)}
    stats = MoEStats()
    chunks = []
    for c in range(vp):
        v = c * mesh.pp + mesh.pp_rank
        chunks.append(OpenMoEModel(cfg, ranges[v], tp, ep, pre_process=v == 0,
                                   post_process=v == len(ranges) - 1, stats=stats, placements=placement))
    return StageModel(chunks)


def build_model(cfg: Config, mesh: ParallelMesh, device: torch.device,
                placement: PlacementArg = None) -> StageModel:
    """This rank's model, initialised, on ``device``, in its compute dtype (bf16 with --bf16, the
    router gate excepted), with activation recomputation applied as the flags ask."""
    model = build_stage_model(cfg, mesh, placement)
    apply_recompute(model, cfg.train)  # --recompute-*: wraps modules, keeps parameter names
    model.init_weights(cfg.train.seed)
    model.to(device)
    if cfg.train.bf16:
        cast_params(model, torch.bfloat16)  # fp32 masters live in the optimizer
    return model


def pretrain(cfg: Config, mesh: ParallelMesh, device: torch.device | None = None,
             placement: PlacementArg = None) -> list[dict[str, Any]]:
    """Train as configured inside an existing mesh; returns the per-iteration records."""
    device = device or torch.device("cpu")
    cfg, train_data, valid_data = build_datasets(cfg, mesh)
    cfg.validate(mesh.world_size)
    torch.manual_seed(cfg.train.seed)
    if placement is None and cfg.train.load:  # resume where the experts were (same EP size only)
        placement = saved_placement(cfg.train.load, mesh.ep)
    try:
        model = build_model(cfg, mesh, device, placement)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError too
        out_of_memory = isinstance(e, MemoryError | torch.OutOfMemoryError) or "allocate" in str(e)
        if not out_of_memory:
            raise
        what = str(e).splitlines()[0] if str(e) else type(e).__name__  # e.g. a --vocab-size of billions
        raise ConfigError(f"the model does not fit in memory on rank {mesh.rank} ({what}); check "
                          "--vocab-size, --hidden-size and --num-experts, or add parallelism") from None
    logger = MetricsLogger(cfg, enabled=mesh.rank == 0)
    t = cfg.train
    if t.lr_warmup_iters >= t.train_iters:
        logger.info(f" > note: --lr-warmup-iters {t.lr_warmup_iters} >= --train-iters {t.train_iters}: the "
                    "learning rate never reaches --lr")
    optimizer = build_optimizer(model, cfg, mesh)
    mem = optimizer.memory_bytes()
    logger.info(" > memory per rank (MiB): " + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in mem.items()))
    counts = count_parameters(cfg)
    logger.info(f" > {mesh.describe()}")
    logger.info(f" > parameters: {counts['total']:,} total, {counts['active']:,} active per token")
    if device.type == "cpu":
        cpu_kernels.library()  # built (once, cached) before the first step, not inside it
        logger.info(f" > CPU expert hidden kernels: {cpu_kernels.status}")
    peak = cfg.train.peak_tflops or measure_peak_tflops(
        device, torch.bfloat16 if cfg.train.bf16 and device.type == "cuda" else torch.float32)
    p2p = None
    if mesh.pp > 1:
        ring, r = mesh.members["pp"], mesh.pp_rank  # wraps around for virtual stages
        seq = cfg.model.seq_length // (mesh.tp if mesh.sequence_parallel else 1)
        p2p = P2P(next=ring[(r + 1) % mesh.pp], prev=ring[(r - 1) % mesh.pp],
                  shape=(cfg.train.micro_batch_size, seq, cfg.model.hidden_size),
                  dtype=torch.bfloat16 if cfg.train.bf16 else torch.float32, device=device)
    trainer = Trainer(cfg, mesh, model, optimizer, train_data, valid_data, logger, device, peak, p2p)
    state = None
    auto_resume = t.load is not None and t.save is not None and (
        os.path.realpath(t.load) == os.path.realpath(t.save))  # --load = --save
    if t.load:
        state = load_checkpoint(t.load, model, optimizer, mesh, cfg, allow_nonfinite=t.allow_nonfinite_load,
                                load_optim=t.load_optim, finetune=t.finetune)
        if state is not None:
            trainer.state = state
            fresh = " with a fresh optimizer" if t.finetune or not t.load_optim else ""
            logger.info(f" > {'weights loaded' if t.finetune else 'resumed'} from {t.load} at iteration "
                        f"{state.iteration}{fresh}")
        elif not auto_resume:
            logger.info(f" > WARNING: no checkpoint in --load {t.load}: training starts from scratch")
    # with --allow-existing-save-dir, this run adds to another run's checkpoints but never replaces one
    trainer.replace_saved = not check_save_directory(t.save, state is not None and auto_resume,
                                                     t.allow_existing_save_dir)
    try:
        return trainer.train()
    finally:
        logger.close()


# How gloo / NCCL say that a peer is gone (connection lost) or did not answer in time.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Connection refused", "gloo/transport",
              "remote process exited", "ncclRemoteError", "remote peer")
_TIMED_OUT = ("Timed out", "timed out", "Watchdog caught collective operation timeout")
_ABORTED = ("communicator was aborted", "is aborted", "ncclCommAbort")  # NCCL's watchdog acted


def check_output_paths(cfg: Config) -> None:
    """Every output path is usable before step 1 (not at the first write, hours in)."""
    t = cfg.train

    def under_a_file(path: str) -> str | None:
        parent = os.path.dirname(os.path.abspath(path))
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        return parent if parent and not os.path.isdir(parent) else None

    if t.metrics_file and os.path.isdir(t.metrics_file):
        raise ConfigError(f"--metrics-file {t.metrics_file} is a directory; pass a file path")
    for flag, path in (("--metrics-file", t.metrics_file), ("--tensorboard-dir", t.tensorboard_dir),
                       ("--save", t.save)):
        if path and under_a_file(path):
            raise ConfigError(f"{flag} {path} is under {under_a_file(path)}, which is a file")
    if t.tensorboard_dir and os.path.exists(t.tensorboard_dir) and not os.path.isdir(t.tensorboard_dir):
        raise ConfigError(f"--tensorboard-dir {t.tensorboard_dir} is a file; pass a directory")


def describe_distributed_failure(error: BaseException, rank: int, timeout_minutes: float) -> str | None:
    """One line saying what went wrong between ranks, or None when ``error`` is not a distributed
    failure (then it is re-raised as it is). A timeout or lost connection means a peer died or hung;
    any other backend error (e.g. an NCCL CUDA failure on this rank) is reported as what it is."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if any(mark in text for mark in _TIMED_OUT):
        return (f"rank {rank} lost the job: a peer did not answer within --distributed-timeout-minutes "
                f"{timeout_minutes} (it died or hangs): {first}")
    if any(mark in text for mark in _PEER_LOST):
        return f"rank {rank} lost the job: a peer rank died (connection lost): {first}"
    if any(mark in text for mark in _ABORTED):
        return (f"rank {rank} lost the job: NCCL's watchdog aborted the communicators after a collective "
                f"timed out or failed (its message is above): {first}")
    if isinstance(error, dist.DistError):
        return f"rank {rank}: distributed backend error ({type(error).__name__}): {first}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        info = detect_launch()
        cfg.validate(info.world_size)  # layout errors before any collective starts
        check_output_paths(cfg)
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
        # NCCL: on a timeout or async error the watchdog aborts the communicators and the next wait
        # raises in Python (2 = CleanUpOnly), instead of killing the process before it can say what.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        backend = init_distributed(info, cfg.parallel.distributed_backend,
                                   cfg.parallel.distributed_timeout_minutes)
        mesh = build_mesh(cfg.parallel, info)
    except ConfigError as e:
        print(f"error: {e}", flush=True)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else \
        torch.device("cpu")
    try:
        pretrain(cfg, mesh, device)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", flush=True)
        return 2
    except RuntimeError as e:  # say what happened between ranks in one line (traceback on stderr)
        message = describe_distributed_failure(e, info.rank, cfg.parallel.distributed_timeout_minutes)
        if message is None:
            raise
        import traceback

        traceback.print_exc()
        print(f"error: {message}", flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # Free the process groups now, while gloo's threads can still take the GIL to drop their
        # last tensors; freed during interpreter shutdown they abort the process (exit code -6).
        mesh.groups.clear()
        del mesh
        gc.collect()
    return 0
