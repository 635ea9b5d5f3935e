# Two images from one file:
#   api    - FastAPI + Celery client, no torch (small):   docker build --target api .
#   worker - CUDA torch + the compression library:        docker build --target worker .
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv/modelpress
COPY pyproject.toml README.md ./
COPY app ./app
COPY compression ./compression
COPY workers ./workers

FROM base AS api
RUN pip install '.[postgres,s3]'
EXPOSE 8000
USER nobody
CMD ["sh", "-c", "modelpress migrate && uvicorn app.main:app --host 0.0.0.0 --port 8000 --proxy-headers"]

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS worker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /srv/modelpress
# The CUDA build of torch for the GPU worker (the CPU-only CI uses the CPU wheel).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY --from=base /srv/modelpress /srv/modelpress
RUN pip install '.[postgres,s3,worker]' && pip install onnxruntime-gpu
USER nobody
CMD ["modelpress", "worker", "--queues", "gpu"]
