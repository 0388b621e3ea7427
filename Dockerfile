# byok-proxy: a small image running `byok-proxy serve` as a non-root user.
#   docker build -t byok-proxy .
#   docker run -p 8080:8080 -e ENCRYPTION_KEY=... -e ADMIN_TOKEN=... -v byok-data:/data byok-proxy
#   upgrading to a release with a new schema: first
#   docker run --rm -v byok-data:/data byok-proxy byok-proxy migrate

# --- build: install the project and its dependencies into a virtualenv --------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /venv
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY admin ./admin
RUN /venv/bin/pip install .

# --- runtime: the virtualenv only, as an unprivileged user ---------------------------------
FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --home-dir /data --create-home byok \
 && mkdir -p /etc/byok && chown byok:byok /etc/byok
COPY --from=build /venv /venv
COPY --chown=byok:byok config.yaml /etc/byok/config.yaml
ENV PATH=/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BYOK_CONFIG=/etc/byok/config.yaml \
    DATABASE_URL=sqlite:////data/byok.db
USER 10001:10001
WORKDIR /data
# /data holds the SQLite database (unused with DATABASE_URL=postgresql+psycopg://...);
# /etc/byok holds config.yaml (mount your own).
VOLUME ["/data", "/etc/byok"]
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["byok-proxy", "serve", "--host", "0.0.0.0", "--port", "8080"]
