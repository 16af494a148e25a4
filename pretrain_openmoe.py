"""Pretrain an OpenMoE model. Megatron-style flags; launch with torchrun or srun, e.g.

    torchrun --nproc-per-node 1 pretrain_openmoe.py --model-preset openmoe-tiny --mock-data \
        --train-iters 100 --global-batch-size 8 --micro-batch-size 2
"""

import sys

from megamoe.training.run import main

if __name__ == "__main__":
    sys.exit(main())
