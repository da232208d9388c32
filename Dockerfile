# One image, two entrypoints: `pgfleet-pooler` (the proxy) and `pgfleet-operator` (the
# kopf operator, which starts pooler pods from this same image by default).
#
#   docker build -t pgfleet:dev .
#
# Build stage: a virtualenv with pgfleet and its operator extras, the pooler's hot path
# compiled by mypyc (`--build-arg PGFLEET_COMPILE=0` for pure Python). Final stage: the
# same slim Python with only that virtualenv copied in: no pip cache, no compilers, no
# mypy, no sources.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# 1: the pooler's hot path compiled by mypyc (setup.py); 0: the pure-Python build.
ARG PGFLEET_COMPILE=1
# The mypy (mypyc) the test suite's compiled run uses: pyproject's test extra pins the same.
ARG MYPY_VERSION=2.4.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# mypyc emits C: it needs a compiler (the python image has Python's headers already).
RUN if [ "$PGFLEET_COMPILE" = 1 ]; then \
        apt-get update \
     && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
     && rm -rf /var/lib/apt/lists/*; \
    fi
RUN python -m venv /opt/pgfleet
WORKDIR /src
# README.md is the package description (pyproject `readme`).
COPY pyproject.toml setup.py README.md* ./
COPY pooler ./pooler
COPY operator ./operator
COPY devtools ./devtools
# Compiled: the wheel is built from a throwaway venv holding mypy (whose mypyc compiles),
# so mypy never reaches /opt/pgfleet. `python -P` and `bin/pip`: with /src first on
# sys.path, ./operator would shadow the standard library's operator module.
RUN /opt/pgfleet/bin/pip install --upgrade pip \
 && if [ "$PGFLEET_COMPILE" = 1 ]; then \
        python -P -m venv /tmp/mypyc \
     && /tmp/mypyc/bin/pip install "mypy==$MYPY_VERSION" 'setuptools>=77' \
     && /tmp/mypyc/bin/pip wheel --no-build-isolation --no-deps -w /tmp/wheels . \
     && set -- /tmp/wheels/pgfleet-*.whl \
     && /opt/pgfleet/bin/pip install "$1[operator]" \
     && /opt/pgfleet/bin/python -P -c 'import pgfleet.pooler.pooler; from pgfleet.pooler.compiled import COMPILED; assert COMPILED, "no mypyc build"'; \
    else \
        /opt/pgfleet/bin/pip install '.[operator]'; \
    fi \
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
