# etcd for the cluster profile (docker-compose.cluster.yml): Debian's etcd-server (3.4) and
# etcd-client (etcdctl, for the health check), from apt, on the same local base image as the
# services. Build context: docker/ (nothing is copied in).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="remote-mvc-etcd" remote-mvc.base-image="${BASE_IMAGE}"

RUN apt-get -o Acquire::Retries=5 update \
 && DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=5 install -y --no-install-recommends etcd-server etcd-client \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
 && mkdir -p /var/lib/etcd-data \
 && chown etcd:etcd /var/lib/etcd-data \
 && etcd --version

USER etcd
EXPOSE 2379 2380
ENV ETCDCTL_API=3
HEALTHCHECK --interval=3s --timeout=5s --start-period=30s --retries=10 \
    CMD ["etcdctl", "--endpoints=http://127.0.0.1:2379", "--command-timeout=4s", "endpoint", "health"]
ENTRYPOINT ["/usr/bin/etcd"]
