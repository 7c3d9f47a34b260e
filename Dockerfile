# One image for the api, realtime and worker services (docker-compose.yml picks the command).
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY builder_engine builder_engine
COPY api api
COPY realtime realtime
COPY workflows workflows
COPY activities activities
COPY workers workers
COPY migrations migrations
COPY emulators emulators
RUN pip install --no-cache-dir '.[local]'
ENV BUILDER_DATA_DIR=/data BUILDER_HOST=0.0.0.0
VOLUME ["/data"]
ENTRYPOINT ["builder-engine"]
