# Alertmanager (Debian's prometheus-alertmanager package) on the same base as the services, with
# the project's config.
#
# Build context: ops/alertmanager
#     docker build -f docker/alertmanager.Dockerfile --build-arg BASE_IMAGE=$(docker/base-image.sh) ops/alertmanager
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="remote-mvc-alertmanager" remote-mvc.base-image="${BASE_IMAGE}"

RUN apt-get -o Acquire::Retries=5 update \
 && DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=5 install -y --no-install-recommends prometheus-alertmanager \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
 && mkdir -p /alertmanager \
 && chown prometheus:prometheus /alertmanager

COPY alertmanager.yml /etc/prometheus/alertmanager.yml
# Fail the build on a broken config, not the container start.
RUN amtool check-config /etc/prometheus/alertmanager.yml

USER prometheus
WORKDIR /alertmanager
EXPOSE 9093
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9093/-/ready', timeout=4)"]
ENTRYPOINT ["/usr/bin/prometheus-alertmanager"]
# --cluster.listen-address= : one instance, no gossip port
CMD ["--config.file=/etc/prometheus/alertmanager.yml", \
     "--storage.path=/alertmanager", \
     "--web.listen-address=:9093", \
     "--cluster.listen-address="]
