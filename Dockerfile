# syntax=docker/dockerfile:1
# One image for both processes; the command chooses (docs/kubernetes.md, docs/local.md):
#   docker run infermon:0.1.0 proxy --upstream http://model:8000      (the default command: proxy)
#   docker run infermon:0.1.0 agent
#   docker run -i infermon:0.1.0 inject - < deployment.yaml
# Runs as a numeric non-root user with a read-only root filesystem: nothing is written at run time.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtual environment with infermon and its compiled data plane -----------------------
FROM ${PYTHON_IMAGE} AS build
# the C compiler mypyc needs for the data plane's hot modules (setup.py); it stays in this stage
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
# the install command the tests run (tests/deploy/test_dockerfile.py), the one a user runs: pip builds
# the wheel in its isolated build environment (pyproject.toml's build requirements), compiling the
# data plane there; a build that is not compiled is a failed build (-I: the installed package, not /src)
RUN python -m venv /opt/infermon \
    && /opt/infermon/bin/pip install '.[k8s]' \
    && /opt/infermon/bin/python -I -c "import proxy._compiled as c, proxy.dataplane.server; assert c.mode() == 'compiled', c.mode()" \
    && /opt/infermon/bin/infermon --version

# -- run: the same Python, the environment, nothing else -------------------------------------------
FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="infermon" \
      org.opencontainers.image.description="Monitoring sidecar for ML inference APIs: proxy (golden signals, tracing, drift) and GPU node agent" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
COPY --from=build /opt/infermon /opt/infermon
# bytecode was compiled at install time; never write it (the root filesystem is read-only)
ENV PATH=/opt/infermon/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# 9463: the proxy port infermon inject gives it in a pod; 8080: its default; 9464: admin; 9465: agent
EXPOSE 8080 9463 9464 9465
# numeric, so Kubernetes' runAsNonRoot can check it; not 1337 (Istio's proxy)
USER 10001:10001
WORKDIR /
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "proxy.deploy.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["infermon"]
CMD ["proxy"]
