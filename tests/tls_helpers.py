"""A test PKI (a CA and the certificates it signs) and a real HTTPS server for MTA-STS.

``TestCa`` makes a root CA with the ``cryptography`` package and issues server
certificates for given names (and 127.0.0.1), written as PEM files that mailgate's
``tls_cert``/``tls_key`` and ``mta_sts_ca_file`` settings take. ``policy_server`` runs
Python's ``http.server`` over TLS on a loopback port and answers
``/.well-known/mta-sts.txt`` per Host header from a dict the test may change.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Issued:
    """A certificate, its key and chain as files, and the objects."""

    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    chain: list[x509.Certificate] = field(default_factory=list)


class TestCa:
    __test__ = False

    def __init__(self, directory: Path, name: str = "mailgate test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, names: list[str], *, expired: bool = False) -> Issued:
        """A server certificate for ``names`` (and 127.0.0.1), with the CA in its chain file."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start = now - datetime.timedelta(days=10 if expired else 1)
        end = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=30)
        alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        alt.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path = self.directory / f"{stem}.crt"
        key_path = self.directory / f"{stem}.key"
        # The chain file carries the CA too: DANE-TA needs the server to present its anchor.
        cert_path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + self.cert.public_bytes(serialization.Encoding.PEM)
        )
        key_path.write_bytes(_pem_key(key))
        return Issued(cert_path, key_path, cert, [cert, self.cert])


def self_signed(directory: Path, stem: str, names: list[str]) -> Issued:
    """A certificate no CA vouches for (what an attacker without the key could show)."""
    return TestCa(directory / f"{stem}-ca", name=f"rogue {stem}").issue(stem, names)


@dataclass
class PolicyServer:
    port: int
    # Host header (without port) -> (status, content type, body)
    policies: dict[str, tuple[int, str, bytes]]
    requests: list[str] = field(default_factory=list)


@contextlib.contextmanager
def policy_server(
    issued: Issued, policies: dict[str, tuple[int, str, bytes]]
) -> Iterator[PolicyServer]:
    """An HTTPS server on 127.0.0.1 serving MTA-STS policies, until the block ends."""
    state = PolicyServer(0, policies)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host = (self.headers.get("Host") or "").split(":")[0].lower()
            state.requests.append(f"{host}{self.path}")
            entry = state.policies.get(host)
            if self.path != "/.well-known/mta-sts.txt" or entry is None:
                entry = (404, "text/plain", b"not found\n")
            status, content_type, body = entry
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if 300 <= status < 400:
                self.send_header("Location", f"https://{host}/elsewhere")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert_path, issued.key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
