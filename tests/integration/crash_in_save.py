"""pretrain_openmoe.py with a fault injected by the test: this process dies (exit code 9) right after
writing its rank file of the checkpoint of iteration ITERATION, before the checkpoint is finalised.

    python -m tests.integration.crash_in_save ITERATION [pretrain flags...]   (from the repository root)

The hook lives here, not in megamoe/training/checkpoint.py, so the production save path carries no
test-only branch.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from megamoe.training import checkpoint
from megamoe.training.run import main


def crash_after_rank_file(iteration: int) -> None:
    """Make checkpoint.write_rank_file exit the process once it has written a file of ``iteration``."""
    real_write = checkpoint.write_rank_file
    # save_checkpoint writes every rank file into "<save>/iter_<7 digits>.tmp/" before renaming it
    target = f"iter_{iteration:07d}.tmp"

    def write_rank_file(path: str, *args: Any, **kwargs: Any) -> None:
        real_write(path, *args, **kwargs)
        if os.path.basename(os.path.dirname(path)) == target:
            os._exit(9)  # no cleanup, no barrier: like a rank killed mid-save

    checkpoint.write_rank_file = write_rank_file


if __name__ == "__main__":
    crash_after_rank_file(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
