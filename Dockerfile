# One image for the operator, the gateway, the Ray head and the volunteer agent (the manifests and the
# Helm chart refer to it as koinon:0.2.0). Not built in this repository's CI: no container engine is
# available there. Build: docker build -t koinon:0.2.0 .
# tini: the agent's and the Ray head's containers run under it (their manifests say
# `command: [tini, --, ...]`), so orphans that Ray's processes and users' job code leave behind are
# reaped instead of piling up as zombies under PID 1.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 procps tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --home-dir /home/koinon koinon

WORKDIR /opt/koinon
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY workers ./workers
COPY proto ./proto
COPY examples ./examples
COPY manifests ./manifests
RUN pip install --no-cache-dir .

USER 10001
ENV HOME=/home/koinon RAY_USAGE_STATS_ENABLED=0
CMD ["koinon-operator"]
