# The ML backend: the README's install (scripts/install.sh), then the README's gunicorn command.
#   docker build -t sim-prelabels .
#   docker run -p 9090:9090 -e LABEL_STUDIO_URL=http://label-studio:8080 -e LABEL_STUDIO_API_KEY=<PAT> \
#              -e BASIC_AUTH_USER=labelstudio -e BASIC_AUTH_PASS=<secret> -v $PWD/models:/models sim-prelabels
# docker-compose.yml runs it next to Label Studio 1.23.2.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
# installs exactly locks/project.txt (scripts/install.sh syncs the venv to it); the download cache goes
RUN SKIP_LABEL_STUDIO=1 bash scripts/install.sh && rm -rf /root/.cache/pip /root/.cache/sim-prelabels/uv
ENV MODEL_DIR=/models PYTHONUNBUFFERED=1
EXPOSE 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s CMD curl -fsS http://localhost:9090/health || exit 1
CMD [".venv/bin/gunicorn", "sim_backend.wsgi:app", "--bind", "0.0.0.0:9090", "--workers", "2", "--threads", "2", "--timeout", "300", "--no-control-socket"]
