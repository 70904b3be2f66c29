# The evolve server: `evolve serve` on port 8500, state in /var/lib/evolve.
#
#   docker build -t evolve -t evolve:0.1.0 .                                         # CPU
#   docker build -t evolve:cuda12 -t evolve:0.1.0-cuda12 --build-arg JAX_FLAVOR=cuda12 .  # NVIDIA GPUs
#   docker run -p 8500:8500 -v evolve-state:/var/lib/evolve --stop-timeout 120 evolve
#   docker run --gpus all ... evolve:cuda12
#
# Arguments after the image name go to `evolve serve` (e.g. `--set generations=8`).
# The server checkpoints on SIGTERM: give it time (--stop-timeout 120).
FROM python:3.11-slim

# cpu: jax from PyPI as the project requires it; cuda12: jax[cuda12], whose
# wheels bring CUDA and cuDNN (the host needs only the NVIDIA driver).
ARG JAX_FLAVOR=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /opt/evolve
# README.m[d]: copied when present (the package metadata reads it).
COPY pyproject.toml README.m[d] ./
COPY evolve ./evolve
COPY service ./service
RUN set -eux; \
    case "$JAX_FLAVOR" in \
      cpu) pip install . ;; \
      cuda12) pip install . "jax[cuda12]" ;; \
      *) echo "JAX_FLAVOR must be cpu or cuda12, got '$JAX_FLAVOR'" >&2; exit 1 ;; \
    esac; \
    cd /; rm -rf /opt/evolve; \
    evolve --help > /dev/null

# A fixed numeric uid, so Kubernetes can verify runAsNonRoot.
RUN groupadd --system --gid 10001 evolve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/evolve --create-home evolve \
    && mkdir -p /var/lib/evolve \
    && chown 10001:10001 /var/lib/evolve

ENV EVOLVE_STATE_DIR=/var/lib/evolve \
    EVOLVE_HOST=0.0.0.0 \
    EVOLVE_PORT=8500 \
    HOME=/home/evolve

USER 10001:10001
WORKDIR /home/evolve
VOLUME ["/var/lib/evolve"]
EXPOSE 8500

# The standard gRPC health service (grpc.health.v1): healthy once the system
# is restored and the server reports SERVING. Plaintext only: with --tls-cert
# set, override this check.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; channel = grpc.insecure_channel('127.0.0.1:' + os.environ.get('EVOLVE_PORT', '8500')); reply = g.HealthStub(channel).Check(h.HealthCheckRequest(), timeout=5); sys.exit(0 if reply.status == h.HealthCheckResponse.SERVING else 1)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["evolve", "serve"]
