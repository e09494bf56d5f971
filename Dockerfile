# The training image the rendered PyTorchJob / TrainJob pods run (kubernetes.image in a spec).
# Build and push (docs/kubernetes.md#the-training-image):
#   docker build -t REGISTRY/ftcluster-train:0.1.0-cu128 .
#   docker push REGISTRY/ftcluster-train:0.1.0-cu128
# No secrets are baked in: object-store credentials reach the pods from Kubernetes Secrets
# (kubernetes.secret_env / env_from_secrets) or workload identity at run time.

# CUDA 12.8 (H100/H200 and Blackwell), cuDNN 9 and Python, pinned by tag and digest so a rebuild gets
# the same base. Its own torch (2.9.1) is replaced below by the one the test suite runs.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime@sha256:7b324d212a4450795b49edba9949b7cdc72429148a64e974334bfe5774d51385

# The torch and DeepSpeed that `make test` runs (Makefile: TORCH_SPEC, DS_SPEC), so the image never runs
# a torch the suite did not; tests/e2e/test_image.py fails when the two files disagree.
ARG TORCH_VERSION=2.13.0
ARG DEEPSPEED_VERSION=0.19.8

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# PyPI's Linux torch wheel is the CUDA 12 build (its CUDA libraries come as pip packages).
RUN python3 -m pip install "torch==${TORCH_VERSION}" \
    && python3 -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')"

# DeepSpeed ships only an sdist: build it against the base image's torch (no build isolation),
# so pip never downloads a second multi-GB torch. Ops are JIT-compiled at run time if needed.
RUN python3 -m pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"

WORKDIR /opt/ftcluster
COPY pyproject.toml README.md ./
COPY ftcluster ./ftcluster
COPY templates ./templates
# ftcluster[train,gpu] from this repository; the torch installed above satisfies torch>=2.9 and is kept
# ([gpu]: Liger-Kernel's fused loss, which the planner assumes on GPUs).
# DL3013 (pin versions): this installs the repository itself; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN python3 -m pip install ".[train,gpu]" \
    && python3 -c "import ftcluster.podexec, ftcluster.train.launch, torch, deepspeed, peft, transformers, s3fs, liger_kernel"

# Non-root: the pods need no privileges (the rendered pod specs request none).
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin ftcluster
USER 1000
WORKDIR /home/ftcluster
ENV HOME=/home/ftcluster \
    HF_HOME=/home/ftcluster/.cache/huggingface

# The manifests set the full command (python3 -m ftcluster.podexec -- python3 -m torch.distributed.run
# ... -m ftcluster.train --spec-env FTCLUSTER_PAYLOAD); the same wrapper is the entry point here.
ENTRYPOINT ["python3", "-m", "ftcluster.podexec", "--"]
CMD ["python3", "-m", "ftcluster.train", "--help"]
