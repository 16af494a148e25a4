# GPU image: NVIDIA's PyTorch container brings CUDA, NCCL, torch, Transformer Engine and apex.
#   docker build -t megamoe .            (.dockerignore keeps .venv, .git, runs/, data/, caches out)
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data:/data -v $PWD/checkpoints:/workspace/megamoe/checkpoints megamoe
# --ipc=host: NCCL and the data loader use shared memory (Docker's default /dev/shm is 64 MB);
# memlock=-1: NCCL / InfiniBand pin memory. Across nodes add --network=host --device=/dev/infiniband.
# Slurm with pyxis/enroot: enroot import -o megamoe.sqsh dockerd://megamoe, then
# CONTAINER_IMAGE=$PWD/megamoe.sqsh (examples/slurm/pretrain_openmoe_8b.sbatch).
FROM nvcr.io/nvidia/pytorch:25.10-py3
WORKDIR /workspace/megamoe
COPY requirements.txt .
# torch from the container is kept (requirements ask for torch>=2.4, already satisfied).
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENV PYTHONPATH=/workspace/megamoe
CMD ["bash", "examples/pretrain_openmoe_8b.sh"]
