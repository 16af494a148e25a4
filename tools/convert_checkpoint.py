#!/usr/bin/env python3
"""Convert checkpoints between Hugging Face (Mixtral, OpenMoE) and megamoe, shard by shard.

    python tools/convert_checkpoint.py --direction hf-to-megamoe --input HF_DIR --output CKPT
    python tools/convert_checkpoint.py --direction megamoe-to-hf --input CKPT --output HF_DIR

hf-to-megamoe reads MixtralForCausalLM or OpenMoeForCausalLM checkpoints (config.json and
model*.safetensors, or pytorch_model*.bin through torch.load(weights_only=True)) one shard at a time
and writes a megamoe checkpoint (iteration 0, no optimizer state) that --load reads under any layout;
train from it with --finetune. megamoe-to-hf reads a checkpoint saved under any layout and writes
config.json and safetensors shards that transformers' from_pretrained loads. Outputs are written
aside and moved into place when complete; an existing output is replaced only with --overwrite.
Check a conversion with tools/forward.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.training.hf_interop import ConvertError, hf_to_megamoe, megamoe_to_hf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--direction", required=True, choices=("hf-to-megamoe", "megamoe-to-hf"))
    p.add_argument("--input", required=True, help="HF checkpoint directory, or megamoe --save directory")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--max-shard-size-mb", type=int, default=5000,
                   help="megamoe-to-hf: largest safetensors shard (MB)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.max_shard_size_mb <= 0:
            raise ConvertError(f"--max-shard-size-mb must be positive, got {args.max_shard_size_mb}")
        if args.direction == "hf-to-megamoe":
            summary = hf_to_megamoe(args.input, args.output, args.overwrite)
        else:
            summary = megamoe_to_hf(args.input, args.output, args.overwrite, args.max_shard_size_mb << 20)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.direction}: {summary} -> {args.output} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
