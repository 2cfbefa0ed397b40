# Prometheus (Debian's package) on the same base as the services, with the project's config.
#
# Build context: ops/prometheus
#     docker build -f docker/prometheus.Dockerfile --build-arg BASE_IMAGE=$(docker/base-image.sh) ops/prometheus
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="remote-mvc-prometheus" remote-mvc.base-image="${BASE_IMAGE}"

RUN apt-get -o Acquire::Retries=5 update \
 && DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=5 install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
 && mkdir -p /prometheus \
 && chown prometheus:prometheus /prometheus

COPY prometheus.yml rules.yml rules_test.yml /etc/prometheus/
# Fail the build on a broken config, not the container start.
RUN promtool check config /etc/prometheus/prometheus.yml \
 && promtool test rules /etc/prometheus/rules_test.yml

USER prometheus
WORKDIR /prometheus
EXPOSE 9090
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/-/ready', timeout=4)"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", \
     "--storage.tsdb.path=/prometheus", \
     "--storage.tsdb.retention.time=2d", \
     "--web.listen-address=:9090", \
     "--web.enable-lifecycle", \
     "--web.console.libraries=/usr/share/prometheus/console_libraries", \
     "--web.console.templates=/usr/share/prometheus/consoles"]
