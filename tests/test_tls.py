"""TLS: http_options.ssl_keyfile / ssl_certfile serve the HTTP proxy and the management
server over HTTPS, with a self-signed certificate made for the test."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import tempfile

import httpx
import pytest

import fleet
from fleet import _api

HERE = os.path.dirname(__file__)


def self_signed(directory) -> tuple[str, str]:
    """(key file, certificate file) for 127.0.0.1, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


def test_proxy_and_management_server_speak_tls(tmp_path):
    key, cert = self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=cert)
    fleet.shutdown()
    fleet.start(http_options={"port": 0, "ssl_keyfile": key, "ssl_certfile": cert},
                management_options={"port": 0})
    try:
        fleet.run(fleet.deployment(_Hello).bind(), name="tls", route_prefix="/tls")
        inst = _api._instance
        assert isinstance(inst, _api.Instance) and inst.ops is not None
        proxy = fleet.status()["proxies"]["http"]
        assert proxy["scheme"] == "https"
        base = f"https://127.0.0.1:{proxy['port']}"
        assert httpx.get(f"{base}/tls", verify=trust).text == "over tls"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{proxy['port']}/tls")     # plain HTTP: refused
        url = inst.ops.url()
        assert url.startswith("https://")
        r = httpx.get(f"{url}/api/instance", verify=trust,
                      headers={"Authorization": f"Bearer {inst.ops.token}"})
        assert r.status_code == 200 and r.json()["management"]["scheme"] == "https"
        # the CLI finds the instance and its scheme in the instance file
        env = dict(os.environ, TMPDIR=tempfile.gettempdir())    # this process's runtime dir
        out = subprocess.run([sys.executable, "-m", "fleet", "status", "--json"],
                             capture_output=True, text=True, timeout=60, cwd=HERE, env=env)
        assert out.returncode == 0, out.stderr
        assert "tls" in json.loads(out.stdout)["applications"]
    finally:
        fleet.shutdown()


def test_half_a_tls_config_is_refused():
    with pytest.raises(ValueError, match="set both ssl_keyfile and ssl_certfile"):
        fleet.start(http_options={"port": 0, "ssl_keyfile": "/k.pem"})


class _Hello:
    def __call__(self, request) -> str:
        return "over tls"
