# The image every job runs: NVIDIA's PyTorch container, transformer-engine, megatron-core and
# this project. Build and push it where your clusters can pull it, then name its tag in the
# cluster profile (container.image) or the recipe (job.image):
#
#   docker build -t registry.example.com/moe-launcher:0.1.0-ngc25.09 .
#   docker push registry.example.com/moe-launcher:0.1.0-ngc25.09
#
# NVIDIA's container already holds torch and transformer-engine built for its CUDA.
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /opt/moe-launcher
COPY pyproject.toml README.md ./
COPY launcher launcher
COPY trainer trainer
COPY templates templates
COPY clusters clusters
COPY recipes recipes
# torch and transformer-engine come from the base image; pip must not replace them.
RUN pip install --no-cache-dir "megatron-core>=0.16,<0.20" pyarrow psutil tokenizers transformers safetensors \
    && pip install --no-cache-dir --no-deps -e . \
    && python -c "import megatron.core, transformer_engine, trainer, launcher"

ENV PYTHONUNBUFFERED=1
