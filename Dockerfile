# The service image: `python -m service serve` on 0.0.0.0, JSON logs. Migrations run as their own one-off command
# (compose.yaml's `migrate`), never on every replica's start.
# Not built in this repository's CI: its machines have no Docker engine (tests/test_container_files.py checks
# what can be checked without one).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ENTITLEMENTS_GRPC_ADDR=0.0.0.0:50051 \
    ENTITLEMENTS_HTTP_ADDR=0.0.0.0:8080 \
    ENTITLEMENTS_LOG_FORMAT=json

WORKDIR /app
# The client package first: the server imports its generated stubs.
COPY clients/python/ clients/python/
RUN pip install ./clients/python
COPY pyproject.toml README.md ./
COPY service/ service/
COPY webhooks/ webhooks/
COPY storage/ storage/
RUN pip install . && useradd --system --uid 10001 entitlements
USER entitlements

EXPOSE 50051 8080
HEALTHCHECK --interval=10s --timeout=3s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2)"
CMD ["python", "-m", "service", "serve"]
