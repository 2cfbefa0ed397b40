"""Cluster mode over TLS: etcd with https and client certificates (--client-cert-auth), certificates
from the project's own private CA (ops/tls/make-certs.sh). Real etcd, in-process replica."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from kit import require_etcd

from remote_mvc import AuditLog, ExampleModel, Metrics, ModelServer, ServiceUnavailable, Settings
from remote_mvc.etcd_store import EtcdStore
from remote_mvc.etcd_testing import EtcdCluster
from remote_mvc.testing import wait_until

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(REPO / "ops/tls/make-certs.sh"), str(out)], check=True, capture_output=True)
    foreign = tmp_path_factory.mktemp("foreign")
    subprocess.run(["bash", str(REPO / "ops/tls/make-certs.sh"), str(foreign)], check=True, capture_output=True)
    return out, foreign


@pytest.fixture(scope="module")
def etcd(certs, tmp_path_factory):
    require_etcd()
    out, _ = certs
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd-tls"), 1,
                          tls=(str(out / "ca.crt"), str(out / "model.crt"), str(out / "model.key")))
    cluster.start()
    yield cluster
    cluster.stop()


def test_replicas_work_over_https_with_client_certificates(etcd, certs, tmp_path):
    out, _ = certs
    settings = Settings(store=etcd.store_setting, etcd_ca=str(out / "ca.crt"), etcd_cert=str(out / "model.crt"),
                        etcd_key=str(out / "model.key"), etcd_prefix="/tls")
    assert settings.etcd_endpoints()[0].startswith("https://")
    servers = [ModelServer("m", ExampleModel, EtcdStore.from_settings(settings),
                           AuditLog(tmp_path / f"a{i}.jsonl"), Metrics()).start() for i in range(2)]
    try:
        assert servers[0].modify({"value": 5}) == 1
        wait_until(lambda: servers[1].snapshot()["revision"] == 1, message="the watch works over TLS too")
        assert servers[1].query()["value"] == 5
    finally:
        for s in servers:
            s.close()


def test_a_client_without_a_certificate_of_the_ca_is_refused(etcd, certs, tmp_path):
    out, foreign = certs
    for store in (EtcdStore(etcd.endpoints, "/tls", ca=str(out / "ca.crt"), timeout=0.5),  # no certificate
                  EtcdStore(etcd.endpoints, "/tls", ca=str(out / "ca.crt"), cert=str(foreign / "model.crt"),
                            key=str(foreign / "model.key"), timeout=0.5)):  # another CA's
        with pytest.raises(ServiceUnavailable):
            store.get("/tls/m/head")
        store.close()
    stranger = EtcdStore(etcd.endpoints, "/tls", ca=str(foreign / "ca.crt"), cert=str(out / "model.crt"),
                         key=str(out / "model.key"), timeout=0.5)
    with pytest.raises(ServiceUnavailable):  # and etcd's own certificate is checked by us
        stranger.get("/tls/m/head")
    stranger.close()
