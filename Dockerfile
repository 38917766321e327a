# One image for every Python service of the car park (worker, beat, summary
# API, Flower, ingest); docker-compose.yml picks the command per service.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY parking ./parking
COPY workers ./workers
COPY celeryconfig.py beat_schedule.py ./
# A plain (non-editable) install of the runtime dependencies only: the test
# and dev extras stay out of the image.
RUN pip install --upgrade pip && pip install .

FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PARKING_API_HOST=0.0.0.0
RUN groupadd --system --gid 10001 parking \
    && useradd --system --uid 10001 --gid parking --home-dir /app \
       --shell /usr/sbin/nologin parking \
    && mkdir -p /app/var \
    && chown parking:parking /app/var
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
USER parking
EXPOSE 8000
# The default command is the summary API; docker-compose.yml gives every other
# service its own command and health check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["parking", "api"]
