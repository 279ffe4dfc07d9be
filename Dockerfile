# Production image: gunicorn with the same app factory and settings as `make run`, as a non-root user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CDS_RULES_DIR=/app/rules \
    CDS_DATABASE_URL=sqlite:////app/data/calcinosis-cds.db \
    PROMETHEUS_MULTIPROC_DIR=/tmp/metrics

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install . && useradd --system --uid 10001 --home /app cds \
    && mkdir -p /app/data /tmp/metrics && chown cds /app/data /tmp/metrics
COPY rules ./rules
COPY gunicorn.conf.py ./

USER cds
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"
# Set CDS_TRUSTED_ISSUERS (mount the file) and CDS_PUBLIC_BASE_URL for a real deployment.
CMD ["gunicorn", "--config", "gunicorn.conf.py", "--bind", "0.0.0.0:8080", "service:create_app()"]
