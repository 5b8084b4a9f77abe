"""HTTPS end to end: `serve run` with `ssl_keyfile`/`ssl_certfile` in http_options, a
certificate made here by a throwaway CA, the OpenAI client trusting that CA."""

import datetime
import ipaddress

import httpx
import openai
import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import TINY, free_port
from tests.serve_run import ROOT, serve_run


def make_certificates(directory):
    """A CA, and a server certificate it signed for 127.0.0.1 / localhost. Returns paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "serve_app test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {name: directory / f"{name}.pem" for name in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tls")
    certs = make_certificates(workdir)
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"].update(port=port, ssl_keyfile=str(certs["key"]), ssl_certfile=str(certs["cert"]))
    config["applications"][0]["args"]["models"] = [{"model": TINY, "num_cpus": 0}]
    base = f"https://127.0.0.1:{port}"
    with serve_run(config, workdir, base, verify=str(certs["ca"])):
        yield base, certs["ca"]


def test_openai_client_over_https_with_a_custom_ca(https_server):
    base, ca = https_server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", http_client=httpx.Client(verify=str(ca)))
    reply = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert reply.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.completions.create(model=TINY, prompt="hello", max_tokens=6, stream=True))
    assert chunks and sum(len(c.choices[0].text) for c in chunks if c.choices) > 0


def test_https_refuses_untrusted_clients_and_plain_http(https_server):
    base, _ = https_server
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{base}/health", timeout=10)  # the system CAs do not know ours
    with pytest.raises(requests.RequestException):
        requests.get(base.replace("https://", "http://") + "/health", timeout=10).raise_for_status()
