"""TLS as the runbook sets it up: a reverse proxy (Debian's caddy) with the facility's certificate in
front of the real Prefect and Tiled servers (auth on), clients that verify it against the
facility's CA from the settings (``server.ca_file``), and clients without that CA refused.

The certificate is signed by a CA made for the test (a facility's private CA); nothing leaves
127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from facility_helpers import SharedFacility

from corrflow.catalog.tiled import open_catalog
from corrflow.operations.server import client_environment, prefect_client, production_settings
from corrflow.operations.sim_facility import free_port

pytestmark = pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy is not installed (make install installs it as root)")


def _write_ca_and_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for localhost / 127.0.0.1 signed by it; returns (ca, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corrflow test facility CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def _caddyfile(*, cert: Path, key: Path, routes: dict[int, int]) -> str:
    """The runbook's Caddyfile, on loopback ports: ``{https port: server port}``."""
    sites = "\n".join(
        f"https://localhost:{https_port} {{\n\ttls {cert} {key}\n\treverse_proxy 127.0.0.1:{server_port}\n}}"
        for https_port, server_port in routes.items()
    )
    # No admin endpoint, no automatic certificates or HTTP->HTTPS redirects (the certificate is given).
    return "{\n\tadmin off\n\tauto_https off\n}\n" + sites + "\n"


@pytest.fixture(scope="module")
def proxied(request, tmp_path_factory):
    facility = SharedFacility.get(request.config)
    facility.ensure_tiled()
    directory = tmp_path_factory.mktemp("tls")
    ca, cert, key = _write_ca_and_certificate(directory)
    prefect_https, tiled_https = free_port(), free_port()
    server = facility.settings.server
    caddyfile = directory / "Caddyfile"
    caddyfile.write_text(_caddyfile(cert=cert, key=key, routes={prefect_https: server.prefect_port, tiled_https: server.tiled_port}))
    env = {**os.environ, "XDG_DATA_HOME": str(directory / "data"), "XDG_CONFIG_HOME": str(directory / "config")}
    log = open(directory / "caddy.log", "wb")
    proxy = subprocess.Popen(["caddy", "run", "--config", str(caddyfile), "--adapter", "caddyfile"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        direct = production_settings(facility.settings)  # the operators' writer key filled in
        settings = direct.model_copy(
            update={
                "prefect": direct.prefect.model_copy(update={"api_url": f"https://localhost:{prefect_https}/api"}),
                "catalog": direct.catalog.model_copy(update={"url": f"https://localhost:{tiled_https}"}),
                "server": server.model_copy(update={"ca_file": ca}),
            }
        )
        _wait_for_tls(f"https://localhost:{prefect_https}/api/health", ca, proxy, directory / "caddy.log")
        yield settings
    finally:
        proxy.terminate()
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
        log.close()


def _wait_for_tls(url: str, ca: Path, proxy: subprocess.Popen, log: Path) -> None:
    import ssl
    import time

    context = ssl.create_default_context(cafile=str(ca))
    for _ in range(200):
        if proxy.poll() is not None:
            pytest.fail(f"caddy exited with {proxy.returncode}: {log.read_text()[-2000:]}")
        try:
            httpx.get(url, verify=context, timeout=2.0)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail(f"caddy did not answer on {url}: {log.read_text()[-2000:]}")


@pytest.mark.fault("auth")
def test_clients_reach_both_servers_through_the_tls_proxy_verified_against_the_facility_ca(proxied):
    settings = proxied
    from prefect.client.orchestration import get_client

    with prefect_client(settings):
        with get_client(sync_client=True) as client:
            assert client.hello().status_code == 200
            assert client.api_url.scheme == "https"
    with open_catalog(settings) as catalog:
        created = catalog.processed.create_container(key=f"tls-test-{os.getpid()}", metadata={"over": "tls"})
        assert created.metadata["over"] == "tls"
        assert created.uri.startswith(settings.catalog.url), "the server's links keep the proxy's https address"
    # What a worker and its flow runs get: the CA in the environment of both clients.
    env = client_environment(settings, "beamline")
    assert env["PREFECT_API_SSL_CERT_FILE"] == env["SSL_CERT_FILE"] == str(settings.server.ca_file)
    assert env["PREFECT_API_URL"].startswith("https://")


@pytest.mark.fault("auth")
def test_a_client_without_the_facility_ca_is_refused(proxied):
    settings = proxied
    untrusted = settings.model_copy(update={"server": settings.server.model_copy(update={"ca_file": None})})
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(settings.prefect.api_url + "/health", timeout=5.0)
    from corrflow.catalog.spool import CatalogUnavailableError

    with pytest.raises(CatalogUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
        with open_catalog(untrusted):
            pass
