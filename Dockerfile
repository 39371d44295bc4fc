# Runtime image for imhub: the gateway, message-service, rtc-service and the
# operator are all `imhub <subcommand>` from this one image.
#
#   docker build -t ghcr.io/imhub/imhub:0.1.0 .
#   docker run --rm ghcr.io/imhub/imhub:0.1.0 --help

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY imhub ./imhub
COPY runtime ./runtime
COPY operator ./operator
COPY migrations ./migrations
COPY crds ./crds
# A wheel, then a clean install of it (with the operator extra) into a venv.
RUN python -m venv /opt/imhub \
 && /opt/imhub/bin/pip install --upgrade pip wheel \
 && /opt/imhub/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/imhub/bin/pip install "$(ls /wheels/imhub-*.whl)[operator]"

FROM python:3.11-slim
ENV PATH=/opt/imhub/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IMHUB_HOST=0.0.0.0 \
    IMHUB_DATA_DIR=/tmp/imhub
COPY --from=build /opt/imhub /opt/imhub
# Fixed uid/gid, matching runAsUser in the operator's manifests.
RUN groupadd --system --gid 10001 imhub \
 && useradd --system --uid 10001 --gid imhub --home-dir /nonexistent --shell /usr/sbin/nologin imhub
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["imhub"]
CMD ["--help"]
