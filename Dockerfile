# The ML backend: same install as a developer machine (scripts/install.sh), then gunicorn.
#   docker build -t sim-prelabels .
#   docker run -p 9090:9090 -e LABEL_STUDIO_URL=http://label-studio:8080 -e LABEL_STUDIO_API_KEY=... \
#              -v $PWD/models:/app/models sim-prelabels
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN SKIP_LABEL_STUDIO=1 bash scripts/install.sh && rm -rf /root/.cache/pip
ENV MODEL_DIR=/app/models PORT=9090 WORKERS=2 THREADS=4 PYTHONUNBUFFERED=1
EXPOSE 9090
CMD .venv/bin/gunicorn sim_backend.wsgi:app --bind 0.0.0.0:${PORT} --workers ${WORKERS} --threads ${THREADS} --timeout 300 --no-control-socket
