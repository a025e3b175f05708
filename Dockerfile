# The reliable worker's image. One image serves every role: worker (the default command),
# beat, Flower and the sandbox provider; docker-compose.yml picks the command per service.
#
#   docker build -t reliable-worker .                       # on python:3.11-slim
#   make test-image                                         # on a local debootstrap base
#
# The build stage builds the project's wheel and installs it, with its dependencies, into a
# virtualenv; the runtime stage is the bare base plus that virtualenv and a non-root user.
# Works with the BuildKit and the legacy builder alike (no RUN --mount).

# Any Debian-like image with python3 (3.11+) and its venv module.
ARG BASE=python:3.11-slim
# The CA bundle pip trusts while it downloads (build stage only): by default the base's own.
# A build behind a TLS-inspecting proxy passes an image holding the host's bundle at
# /etc/ssl/certs/ca-certificates.crt (tests/image/prepare.sh makes one). Nothing of it
# reaches the runtime stage.
ARG CA_IMAGE=${BASE}

FROM ${CA_IMAGE} AS ca

# The dependencies (and the [flower] extra) as a requirements file. Docker caches a COPY by
# content: an edit of pyproject.toml that leaves them alone reuses the install layer below.
FROM ${BASE} AS requirements
COPY pyproject.toml /src/
RUN python3 -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['flower']))" > /requirements.txt

FROM ${BASE} AS build
COPY --from=ca /etc/ssl/certs/ca-certificates.crt /tmp/build-ca.crt
ENV PIP_CERT=/tmp/build-ca.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --quiet --upgrade pip
# Dependencies first: a source change reuses this layer.
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install --quiet --requirement /tmp/requirements.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY config config
COPY reliability reliability
COPY worker worker
COPY tasks tasks
# The wheel, installed with --no-index: every dependency must already be in the layer above.
RUN /opt/venv/bin/pip wheel --quiet --no-deps --wheel-dir /dist . \
    && /opt/venv/bin/pip install --quiet --no-index "$(ls /dist/*.whl)[flower]" \
    && /opt/venv/bin/pip check

FROM ${BASE} AS runtime
RUN groupadd --gid 10001 reliable \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/reliable \
        --shell /usr/sbin/nologin reliable
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELIABLE_ENVIRONMENT=production
# Numeric, so a runtime that requires a non-root user can check it without /etc/passwd.
USER 10001:10001
WORKDIR /home/reliable
# The worker answers a ping addressed to its own node name (celery@<hostname>, Celery's
# default). A container running beat, Flower or the sandbox turns it off or replaces it.
# To become a check of the heartbeat file once the worker writes one (RELIABLE_HEALTH__*).
# Healthy while the worker's event loop touches its liveness file (every 5 s, a Celery
# bootstep: RELIABLE_HEALTH__WORKER_FILE); it goes stale when the loop is stuck or the
# broker has been unreachable for longer than the window.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD sh -c 'test $(( $(date +%s) - $(stat -c %Y "${RELIABLE_HEALTH__WORKER_FILE:-/tmp/reliable-worker-alive}") )) -lt 90' 
# SIGTERM (docker stop) is Celery's warm shutdown: give the container at least
# RELIABLE_WORKER__SOFT_SHUTDOWN_TIMEOUT_SECONDS (30) + 10 s (docker stop -t 45).
CMD ["celery", "-A", "worker.app", "worker", "-l", "INFO"]
