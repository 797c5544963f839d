"""TLS on the gRPC port, mutual TLS, and the plaintext health port for probes: a real server (HF reference
engine, tiny model) over real sockets, with a CA, a server and a client certificate made for the test."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_harness import ServerThread, random_ids, tiny_config
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emserve.client import Client, ClientError
from emserve.server.config import ConfigError
from emserve.server.engine.reference import ReferenceEngine


def _cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signer = issuer if issuer is not None else (subject, key)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return b.sign(signer, hashes.SHA256())


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA; a server certificate for 127.0.0.1 it signed; a client certificate it signed; and a client
    certificate of another, unknown CA."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("emserve test CA", ca_key, None, ca=True)
    other = _cert("another CA", other_key, None, ca=True)
    files: dict[str, Path] = {}
    for name, obj in (("ca", ca), ("other_ca", other)):
        files[name] = d / f"{name}.pem"
        files[name].write_bytes(_pem(obj))
    for name, issuer, server in (("server", (ca.subject, ca_key), True), ("client", (ca.subject, ca_key), False),
                                 ("stranger", (other.subject, other_key), False)):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{name}_key"] = d / f"{name}.key"
        files[f"{name}_key"].write_bytes(_pem(key))
        files[name] = d / f"{name}.pem"
        files[name].write_bytes(_pem(_cert(name, key, issuer, server=server)))
    return files


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> ReferenceEngine:
    return ReferenceEngine(str(tiny_model_dir), dtype="float32", log_dtype="float32", max_model_len=1024)


def _server(tiny_model_dir: Path, tmp_path: Path, engine: ReferenceEngine, pki: dict[str, Path],
            mutual: bool) -> ServerThread:
    extra = {"tls_client_ca": str(pki["ca"])} if mutual else {}
    return ServerThread(tiny_config(tiny_model_dir, tmp_path / "sessions", tls_cert=str(pki["server"]),
                                    tls_key=str(pki["server_key"]), health_port=0, **extra), engine)


@pytest.fixture
def tls_server(tiny_model_dir: Path, tmp_path: Path, engine: ReferenceEngine,
               pki: dict[str, Path]) -> Iterator[ServerThread]:
    srv = _server(tiny_model_dir, tmp_path, engine, pki, mutual=False)
    yield srv
    srv.stop()


@pytest.fixture
def mtls_server(tiny_model_dir: Path, tmp_path: Path, engine: ReferenceEngine,
                pki: dict[str, Path]) -> Iterator[ServerThread]:
    srv = _server(tiny_model_dir, tmp_path, engine, pki, mutual=True)
    yield srv
    srv.stop()


def _creds(pki: dict[str, Path], who: str | None = None, ca: str = "ca") -> grpc.ChannelCredentials:
    if who is None:
        return grpc.ssl_channel_credentials(pki[ca].read_bytes())
    return grpc.ssl_channel_credentials(pki[ca].read_bytes(), pki[f"{who}_key"].read_bytes(), pki[who].read_bytes())


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        request = health_pb2.HealthCheckRequest(service="readiness")
        return health_pb2_grpc.HealthStub(ch).Check(request, timeout=10).status


def test_tls_serves_clients_that_trust_its_ca_and_nothing_in_plaintext(tls_server: ServerThread,
                                                                       pki: dict[str, Path]) -> None:
    with Client(tls_server.address, credentials=_creds(pki), timeout=30) as c:
        c.create_session("t")
        c.ingest_tokens("t", random_ids(80, 1))
        assert c.get_session("t").num_tokens == 80
        assert c.ask("t", [5, 6, 7], max_tokens=3, ignore_eos=True).token_ids
    with Client(tls_server.address, timeout=5) as plain, pytest.raises(ClientError) as ei:
        plain.get_session("t")
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE  # no TLS handshake, no call
    with Client(tls_server.address, credentials=_creds(pki, ca="other_ca"), timeout=5) as wrong, \
            pytest.raises(ClientError) as ei:
        wrong.get_session("t")  # the server's certificate is not trusted
    assert ei.value.code == grpc.StatusCode.UNAVAILABLE
    # probes that cannot speak TLS ask the plaintext health port (health only)
    assert tls_server.server.health_port is not None
    health_address = f"127.0.0.1:{tls_server.server.health_port}"
    assert _health(health_address) == health_pb2.HealthCheckResponse.SERVING
    with Client(health_address, timeout=5) as c, pytest.raises(ClientError) as ei:
        c.get_session("t")
    assert ei.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_mutual_tls_needs_a_client_certificate_its_ca_signed(mtls_server: ServerThread, pki: dict[str, Path]) -> None:
    with Client(mtls_server.address, credentials=_creds(pki, "client"), timeout=30) as c:
        c.create_session("m")
        assert c.get_session("m").num_tokens == 0
    for creds in (_creds(pki), _creds(pki, "stranger")):  # no client certificate; one of an unknown CA
        with Client(mtls_server.address, credentials=creds, timeout=5) as c, pytest.raises(ClientError) as ei:
            c.get_session("m")
        assert ei.value.code == grpc.StatusCode.UNAVAILABLE
    assert _health(f"127.0.0.1:{mtls_server.server.health_port}") == health_pb2.HealthCheckResponse.SERVING


def test_tls_settings_are_checked(tiny_model_dir: Path, tmp_path: Path, pki: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="go together"):
        tiny_config(tiny_model_dir, tmp_path, tls_cert=str(pki["server"]))
    with pytest.raises(ConfigError, match="needs tls_cert"):
        tiny_config(tiny_model_dir, tmp_path, tls_client_ca=str(pki["ca"]))
    with pytest.raises(ConfigError, match="cannot read"):
        tiny_config(tiny_model_dir, tmp_path, tls_cert=str(tmp_path / "missing.pem"), tls_key=str(pki["server_key"]))
