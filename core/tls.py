"""TLS for the listeners: the server SSL context (TLS 1.2+) and the first-start self-signed cert."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailgate.core.errors import ConfigError

log = logging.getLogger("mailgate.tls")


def ensure_certificate(
    cert: Path | None, key: Path | None, data_dir: Path, hostname: str
) -> tuple[Path, Path]:
    """Return the configured pair, or the self-signed pair in the data dir (made if missing)."""
    if cert is not None and key is not None:
        return cert, key
    tls_dir = data_dir / "tls"
    cert_path, key_path = tls_dir / "selfsigned.crt", tls_dir / "selfsigned.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        alt_names.append(x509.DNSName("localhost"))
    alt_names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(private_key, hashes.SHA256())
    )
    key_bytes = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(key_path, key_bytes, 0o600)
    _write_private(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    log.warning(
        "no TLS certificate configured: created a self-signed certificate for %s in %s "
        "(set tls_cert and tls_key for a real one)",
        hostname,
        cert_path,
    )
    return cert_path, key_path


def _write_private(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context that speaks TLS 1.2 or newer only, with the given pair loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.verify_mode = ssl.CERT_NONE
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"tls_cert/tls_key: cannot load {cert} / {key}: {exc}"]) from None
    return context
