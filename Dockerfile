# GPU image: NVIDIA's PyTorch container brings CUDA, NCCL, torch, Transformer Engine and apex.
FROM nvcr.io/nvidia/pytorch:25.10-py3
WORKDIR /workspace/megamoe
COPY requirements.txt .
# torch from the container is kept (requirements ask for torch>=2.4, already satisfied).
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENV PYTHONPATH=/workspace/megamoe
CMD ["bash", "examples/pretrain_openmoe_8b.sh"]
