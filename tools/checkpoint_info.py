#!/usr/bin/env python3
"""Print what a megamoe checkpoint holds.

    python tools/checkpoint_info.py DIR            # DIR/latest, or an iter_* directory
    python tools/checkpoint_info.py DIR --tensors  # also every logical tensor and its pieces

Shows the iteration, consumed samples, the layout and model that saved it, the files and bytes, and
per logical tensor which kinds (weight, fp32 master, AdamW moments) are stored. Reads only the
safetensors headers and meta.json (no pickle, no tensor data).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.training.checkpoint import CheckpointError, _Index, read_meta, resolve_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir")
    p.add_argument("--tensors", action="store_true", help="list every logical tensor")
    args = p.parse_args(argv)
    try:
        path = resolve_checkpoint(args.dir)
        if path is None:
            raise CheckpointError(f"{args.dir} holds no checkpoint (no 'latest' and no meta.json)")
        meta = read_meta(path)
        index = _Index(path, int(meta["files"]))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        _describe(path, meta, index, args.tensors)
    except (KeyError, TypeError, ValueError) as e:
        print(f"error: checkpoint {path}/meta.json lacks or garbles {e}; save the checkpoint again",
              file=sys.stderr)
        return 1
    return 0


def _describe(path: str, meta: dict, index: _Index, tensors: bool) -> None:
    cfg = meta["config"]
    m, moe = cfg["model"], cfg["moe"]
    size = sum(os.path.getsize(f) for f in index.files)
    print(f"checkpoint     {path}")
    print(f"iteration      {meta['iteration']}   consumed samples {meta['consumed_samples']}   "
          f"AdamW step {meta['adam_step']:.0f}")
    print(f"saved by       {meta['layout']}")
    print(f"model          {m['num_layers']} layers, hidden {m['hidden_size']}, heads "
          f"{m['num_attention_heads']}x{m['kv_channels']}, ffn {m['ffn_hidden_size']}, "
          f"vocab {m['vocab_size']}, {moe['num_experts']} experts top-{moe['router_topk']} "
          f"every {moe['layer_freq']} layers")
    if "placement" in meta:  # logical expert -> EP rank
        pl = meta["placement"]
        for layer, table in sorted(pl.get("layers", {"all": pl}).items(), key=lambda kv: str(kv[0]).zfill(6)):
            print(f"placement      EP {pl['ep_size']} layer {layer}: expert->rank {table['rank_of']}")
    print(f"files          {len(index.files)} x safetensors, {size / 2**20:.2f} MiB")
    kinds: dict[str, int] = {}
    keys: dict[str, set[str]] = {}
    for kind, key in index.entries:
        kinds[kind] = kinds.get(kind, 0) + 1
        keys.setdefault(key, set()).add(kind)
    print(f"tensors        {len(keys)} logical: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))
    if tensors:
        for key in sorted(keys):
            pieces = index.entries[("weight", key)]
            print(f"  {key:60s} {'+'.join(sorted(keys[key])):35s} {len(pieces)} piece(s)")


if __name__ == "__main__":
    sys.exit(main())
