"""TLS to Redis and to Kafka through the real flow, and an untrusted certificate failing fast.

Redis: Debian's ``redis-server`` (7, built with TLS; the wheels' servers are not).
Kafka: the embedded broker behind Debian's ``stunnel4`` (a TLS terminator), advertising
the TLS port. Certificates are made for each run with ``openssl``.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from msgspec.structs import replace

from engine.settings import Settings, load_settings
from leadflow.servers import (
    LocalBroker,
    LocalRedis,
    answers_ping,
    free_port,
    stop_process,
    wait_listening,
)
from leadflow.topics import create_topics
from tests.integration.flow import hot_lead, outputs, person_of, run_flow, send

SYSTEM_REDIS = "/usr/bin/redis-server"


@dataclass
class Certificates:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # trusts nothing the servers present


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not on PATH: apt-get install openssl (.ci/run does)")
    d = tmp_path_factory.mktemp("tls")
    for name in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.crt"),
                 "-subj", f"/CN=leadflow test {name}")  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "server.key"),
             "-out", str(d / "server.csr"), "-subj", "/CN=127.0.0.1")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
             "-out", str(d / "server.crt"), "-extfile", str(d / "san.ext"))  # fmt: skip
    return Certificates(d / "ca.crt", d / "server.crt", d / "server.key", d / "other-ca.crt")


class TlsRedis(LocalRedis):
    """Debian's redis-server serving TLS only, on our port."""

    def __init__(self, certificates: Certificates):
        super().__init__(SYSTEM_REDIS)
        self.certificates = certificates

    def command(self) -> list[str]:
        cmd = super().command()
        at = cmd.index("--port")
        cmd[at : at + 2] = ["--port", "0", "--tls-port", str(self.port)]
        c = self.certificates
        return [*cmd, "--tls-cert-file", str(c.cert), "--tls-key-file", str(c.key),
                "--tls-ca-cert-file", str(c.ca), "--tls-auth-clients", "no"]  # fmt: skip

    def answers(self) -> bool:
        """PING over TLS, verified against our CA: a TLS-only port never answers plaintext."""
        context = ssl.create_default_context(cafile=str(self.certificates.ca))
        try:
            with (
                socket.create_connection((self.host, self.port), timeout=0.5) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
            ):
                return answers_ping(conn)
        except OSError:  # refused, or the handshake failed (ssl.SSLError)
            return False

    def tls_url(self, ca: Path) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={ca}"


@pytest.fixture
def tls_redis(certificates: Certificates) -> Iterator[TlsRedis]:
    if not os.access(SYSTEM_REDIS, os.X_OK):
        pytest.skip(f"{SYSTEM_REDIS} not installed: apt-get install redis-server (.ci/run does)")
    with TlsRedis(certificates) as server:
        assert isinstance(server, TlsRedis)
        yield server


@dataclass
class TlsBroker:
    broker: LocalBroker
    port: int  # where stunnel serves TLS (and the broker says it is)


@pytest.fixture
def tls_broker(certificates: Certificates, tmp_path: Path) -> Iterator[TlsBroker]:
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    if stunnel is None:
        pytest.skip("stunnel4 not on PATH: apt-get install stunnel4 (.ci/run does)")
    port = free_port()
    with LocalBroker(advertised_port=port) as broker:
        assert isinstance(broker, LocalBroker)
        conf = tmp_path / "stunnel.conf"
        conf.write_text(
            "foreground = yes\npid =\n[kafka]\n"
            f"accept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{broker.port}\n"
            f"cert = {certificates.cert}\nkey = {certificates.key}\n"
        )
        proc = subprocess.Popen([stunnel, str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_listening(port, proc, timeout_s=10)
            yield TlsBroker(broker, port)
        finally:
            stop_process(proc)


def leadflow_config_check(env: dict[str, str]) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "leadflow.cli", "config", "check", "--connect"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def a_lead_through_the_flow(settings: Settings) -> None:
    """A hot lead through the real flow: one decision, an MQL in Redis."""
    send(settings, hot_lead("tls-lead"))
    run_flow(settings, 1)
    assert len(outputs(settings).decisions) == 1
    assert person_of(settings, {"anonymousId": "tls-lead"}).stage == "mql"


def test_redis_over_tls_with_a_verified_certificate(
    broker: LocalBroker, tls_redis: TlsRedis, certificates: Certificates
) -> None:
    env = {"LEADFLOW_KAFKA_BOOTSTRAP": broker.bootstrap, "LEADFLOW_ALERTS_METRICS_PORT": "0",
           "LEADFLOW_REDIS_URL": tls_redis.tls_url(certificates.ca)}  # fmt: skip
    settings = load_settings(env=env)
    settings = replace(settings, dataflow=replace(settings.dataflow, stop_at_end=True))
    create_topics(settings, partitions=1)
    a_lead_through_the_flow(settings)

    code, said, seconds = leadflow_config_check(
        {**env, "LEADFLOW_REDIS_URL": tls_redis.tls_url(certificates.other_ca)}
    )
    assert code == 3, said
    assert "TLS certificate is not trusted" in said and "CERTIFICATE_VERIFY_FAILED" in said
    assert seconds < 15, "an untrusted certificate is not retried for half a minute"


def test_kafka_over_tls_with_a_verified_certificate(
    tls_broker: TlsBroker, redis_server: LocalRedis, certificates: Certificates
) -> None:
    env = {
        "LEADFLOW_KAFKA_BOOTSTRAP": f"127.0.0.1:{tls_broker.port}",
        "LEADFLOW_KAFKA_OPT_SECURITY_PROTOCOL": "SSL",
        "LEADFLOW_KAFKA_OPT_SSL_CA_LOCATION": str(certificates.ca),
        "LEADFLOW_REDIS_URL": redis_server.url,
        "LEADFLOW_ALERTS_METRICS_PORT": "0",
    }
    settings = load_settings(env=env)
    assert settings.kafka.options["ssl.ca.location"] == str(certificates.ca)
    settings = replace(settings, dataflow=replace(settings.dataflow, stop_at_end=True))
    create_topics(settings, partitions=1)
    a_lead_through_the_flow(settings)
    code, said, _ = leadflow_config_check(env)
    assert code == 0, said

    code, said, seconds = leadflow_config_check(
        {**env, "LEADFLOW_KAFKA_OPT_SSL_CA_LOCATION": str(certificates.other_ca)}
    )
    assert code == 4, said
    assert "refused the connection" in said and "certificate verify failed" in said, said
    assert seconds < 15
