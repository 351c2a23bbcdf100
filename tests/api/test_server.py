"""The API over HTTPS with a private CA made here, and with client certificates required."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.harness import make_settings


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def _server_files(ca: trustme.CA, directory: Path) -> dict[str, str]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    ca_file = directory / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    return {"tls_cert_file": str(cert_file), "tls_key_file": str(key_file), "ca": str(ca_file)}


async def test_the_api_serves_https_with_the_configured_certificate(
    tmp_path: Path, broker: tuple[str, int], serve_gateway: Any, ca: trustme.CA
) -> None:
    files = _server_files(ca, tmp_path)
    ca_file = files.pop("ca")
    settings = make_settings(tmp_path, broker, server=files)
    async with serve_gateway(settings) as (_gateway, server):
        assert server.url.startswith("https://")
        trusting = ssl.create_default_context(cafile=ca_file)
        async with httpx.AsyncClient(base_url=server.url, verify=trusting) as client:
            assert (await client.get("/health")).status_code == 200
            stored = await client.post(
                "/api/v1/event", json={"topic": "devices/tls-1/telemetry", "payload": {"t": 1}}
            )
            assert stored.status_code == 201, stored.text
        with pytest.raises(httpx.ConnectError):  # a client that does not trust our CA
            async with httpx.AsyncClient(base_url=server.url) as untrusting:
                await untrusting.get("/health")
        plain = server.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the HTTPS port gets no answer
            async with httpx.AsyncClient(base_url=plain, timeout=5) as client:
                await client.get("/health")


async def test_client_certificates_are_required_when_a_client_ca_is_set(
    tmp_path: Path, broker: tuple[str, int], serve_gateway: Any, ca: trustme.CA
) -> None:
    files = _server_files(ca, tmp_path)
    ca_file = files.pop("ca")
    settings = make_settings(tmp_path, broker, server={**files, "tls_client_ca_file": ca_file})
    client_cert = ca.issue_cert("operator@example.org")
    with_cert = ssl.create_default_context(cafile=ca_file)
    client_cert.configure_cert(with_cert)
    stranger = trustme.CA().issue_cert("stranger@example.org")
    wrong_ca = ssl.create_default_context(cafile=ca_file)
    stranger.configure_cert(wrong_ca)
    async with serve_gateway(settings) as (_gateway, server):
        async with httpx.AsyncClient(base_url=server.url, verify=with_cert) as client:
            assert (await client.get("/health")).status_code == 200
        for context in (ssl.create_default_context(cafile=ca_file), wrong_ca):
            with pytest.raises(httpx.HTTPError):
                async with httpx.AsyncClient(base_url=server.url, verify=context) as client:
                    await client.get("/health")
