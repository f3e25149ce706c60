# mirror: a read-only OCI registry pull-through cache.
#
#   docker build -t mirror .
#   docker run -p 5000:5000 -v mirror-cache:/var/cache/mirror mirror
#
# Configure with MIRROR_* environment variables (e.g. MIRROR_CACHE_MAX_SIZE=500GiB) or mount a
# TOML file and set MIRROR_CONFIG=/etc/mirror/mirror.toml (see deploy/mirror.example.toml).

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/mirror
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mirror ./mirror
RUN /opt/mirror/bin/pip install .

FROM python:3.11-slim
# A fixed, numeric non-root user: Kubernetes manifests refer to 10001 (runAsUser, fsGroup).
RUN groupadd --system --gid 10001 mirror \
 && useradd --system --uid 10001 --gid mirror --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin mirror \
 && mkdir -p /var/cache/mirror \
 && chown mirror:mirror /var/cache/mirror
COPY --from=build /opt/mirror /opt/mirror
ENV PATH=/opt/mirror/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MIRROR_CACHE_DIR=/var/cache/mirror
# The directory is created and owned by `mirror` before VOLUME, so a fresh named volume
# inherits that ownership and the non-root process can write to it.
VOLUME /var/cache/mirror
USER 10001:10001
EXPOSE 5000
# No curl in the slim image; Python is already there. Assumes the default listen port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=4)"]
CMD ["mirror", "serve"]
