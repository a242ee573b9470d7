# slotfill worker on the official vLLM image: CUDA, PyTorch and vLLM come from the image,
# slotfill and its light worker extras are installed on top.
#   docker build -t slotfill-worker .
#   docker run --gpus all -e SLOTFILL_REDIS_URL=redis://host:6379/0 slotfill-worker worker
FROM vllm/vllm-openai:v0.26.0

WORKDIR /opt/slotfill
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
COPY slotfill ./slotfill
# worker-common = the CLI, prometheus-client, sentry-sdk, tokenizers (the `worker` extra would
# pull vLLM again); celery for completion callbacks. The image's vLLM/torch stay untouched.
RUN python3 -m pip install --no-cache-dir ".[worker-common,celery]" \
 && python3 -c "import slotfill, slotfill.cli.main, worker.ops"

ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/root/.cache/huggingface \
    SLOTFILL_METRICS_PORT=9400
EXPOSE 9400
# SIGTERM: stop pulling, finish in-flight jobs within SLOTFILL_GRACE_SECONDS, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["slotfill"]
CMD ["worker"]
