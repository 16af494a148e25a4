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
    """Make checkpoint.save_file exit the process once it has written a file of ``iteration``."""
    real_save_file = checkpoint.save_file
    # save_checkpoint writes every rank file into "<save>/iter_<7 digits>.tmp/" before renaming it
    target = f"iter_{iteration:07d}.tmp"

    def save_file(tensors: dict[str, Any], filename: str, *args: Any, **kwargs: Any) -> None:
        real_save_file(tensors, filename, *args, **kwargs)
        if os.path.basename(os.path.dirname(filename)) == target:
            os._exit(9)  # no cleanup, no barrier: like a rank killed mid-save

    checkpoint.save_file = save_file


if __name__ == "__main__":
    crash_after_rank_file(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
