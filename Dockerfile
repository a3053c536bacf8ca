# syntax=docker/dockerfile:1
# connwatch container image.
#
#   docker build -t connwatch:0.1.0 .
#   docker run --rm -p 7000:7000 -p 9464:9464 --stop-timeout 40 \
#       -v "$PWD/connwatch.yaml:/etc/connwatch/connwatch.yaml:ro" connwatch:0.1.0
#
# The config inside a container MUST set `admin.listen: "0.0.0.0:9464"` (or the environment
# variable CONNWATCH_ADMIN__LISTEN=0.0.0.0:9464): the default 127.0.0.1:9464 is unreachable
# for Prometheus and for Kubernetes probes, which connect to the container's own IP.
# The example config baked in below (deploy/docker/connwatch.yaml) already does.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: turn the source tree and its dependencies into wheels -------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# All wheels (connwatch and its dependencies) are built here so that the runtime stage
# installs offline and needs no compiler.
RUN pip wheel --wheel-dir /wheels .

# ---- runtime ------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index /wheels/*.whl \
    && groupadd --system --gid 10001 connwatch \
    && useradd --system --uid 10001 --gid connwatch --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin connwatch
COPY --chown=root:root --chmod=0644 deploy/docker/connwatch.yaml /etc/connwatch/connwatch.yaml

# Numeric UID so that Kubernetes `runAsNonRoot` can verify it without reading /etc/passwd.
USER 10001:10001

# 9464: admin endpoint (/metrics /healthz /readyz /connections); 7000: the example listener.
EXPOSE 9464 7000

# slim images carry no curl: probe /healthz with the standard library. urlopen raises on any
# non-2xx answer or connection error, which makes the check exit 1.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2)"]

# SIGTERM starts the graceful drain (stop accepting, /readyz 503, wait up to
# shutdown.drain_timeout, then close the rest). connwatch installs its own signal handlers, so
# it behaves correctly as PID 1 and needs no tini; add `docker run --init` if you exec extra
# processes into the container and want them reaped. Give the runtime a stop timeout longer
# than drain_timeout + 5s (`docker run --stop-timeout 40`, compose `stop_grace_period: 40s`,
# Kubernetes `terminationGracePeriodSeconds`), or the drain is cut short by SIGKILL.
STOPSIGNAL SIGTERM

ENTRYPOINT ["connwatch"]
CMD ["run", "-c", "/etc/connwatch/connwatch.yaml"]
