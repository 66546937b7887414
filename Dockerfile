# One image for every Continuum service; the command picks the service.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-cache-dir .
ENV CONTINUUM_DATA_DIR=/data CONTINUUM_LOG_FORMAT=json
VOLUME /data
ENTRYPOINT ["continuum"]
