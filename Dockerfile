# One image, two entrypoints: `pgfleet-pooler` (the proxy) and `pgfleet-operator` (the
# kopf operator, which starts pooler pods from this same image by default).
#
#   docker build -t pgfleet:dev .
#
# Build stage: a virtualenv with pgfleet and its operator extras. Final stage: the same
# slim Python with only that virtualenv copied in: no pip cache, no compilers, no sources.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/pgfleet
WORKDIR /src
# README.md is the package description (pyproject `readme`).
COPY pyproject.toml README.md* ./
COPY pooler ./pooler
COPY operator ./operator
COPY devtools ./devtools
RUN /opt/pgfleet/bin/pip install --upgrade pip \
 && /opt/pgfleet/bin/pip install '.[operator]' \
 && /opt/pgfleet/bin/pgfleet-operator crd > /dev/null

FROM ${PYTHON_IMAGE}
# A fixed numeric user: pods run with runAsNonRoot, which the kubelet can only verify
# for a numeric UID (the operator's rendered pods use the same 10001).
RUN groupadd --system --gid 10001 pgfleet \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pgfleet
COPY --from=build /opt/pgfleet /opt/pgfleet
ENV PATH=/opt/pgfleet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 5432 8080
CMD ["pgfleet-operator", "run"]
