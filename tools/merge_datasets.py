"""Concatenate Megatron indexed datasets (same dtype) into one, in the order given.

    python tools/merge_datasets.py --input PREFIX1 PREFIX2 ... --output-prefix OUT
    python tools/merge_datasets.py --input DIR --output-prefix OUT    # every PREFIX.idx/.bin in DIR,
                                                                      # in sorted name order

OUT.bin/.idx are written under temporary names and renamed into place once complete and synced, so a
failed merge leaves any previous OUT as it was; an existing OUT is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.data.errors import DataError  # noqa: E402
from megamoe.data.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetBuilder,
    WriteAside,
    bin_path,
    existing_outputs,
    idx_path,
)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Prefixes; a single directory stands for the sorted prefixes with both .idx and .bin in it."""
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        d = inputs[0]
        prefixes = sorted(os.path.join(d, f[:-4]) for f in os.listdir(d)
                          if f.endswith(".idx") and os.path.isfile(os.path.join(d, f[:-4] + ".bin")))
        if not prefixes:
            raise DataError(f"{d}: no PREFIX.idx with a matching PREFIX.bin in this directory")
        return prefixes
    return inputs


def merge(inputs: list[str], output_prefix: str, overwrite: bool = False) -> int:
    """Write OUT.bin/.idx; returns the number of sequences."""
    prefixes = expand_inputs(inputs)
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise DataError(f"{output_prefix}: the output prefix is also an input; choose another")
    existing_outputs([bin_path(output_prefix), idx_path(output_prefix)], overwrite)
    datasets = [IndexedDataset(p) for p in prefixes]  # validates every input before writing
    for p, ds in zip(prefixes, datasets):
        if ds.dtype != datasets[0].dtype:
            raise DataError(f"{idx_path(p)}: dtype {ds.dtype.name} differs from {datasets[0].dtype.name} "
                            f"of {prefixes[0]}; merge only data preprocessed with the same tokenizer")
    total = sum(len(ds) for ds in datasets)
    del datasets
    with WriteAside() as aside:
        os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
        builder = IndexedDatasetBuilder(aside.path(bin_path(output_prefix)),
                                        IndexedDataset(prefixes[0]).dtype)
        for p in prefixes:
            builder.add_index(p)
        builder.finalize(aside.path(idx_path(output_prefix)))
        aside.commit()
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="prefixes, or one directory of them")
    p.add_argument("--output-prefix", required=True, help="writes OUT.bin and OUT.idx")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT.bin/.idx (only once the merged one is complete)")
    args = p.parse_args(argv)
    try:
        n = merge(args.input, args.output_prefix, args.overwrite)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {n} sequences into {args.output_prefix}.bin/.idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
