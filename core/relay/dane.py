"""DANE for SMTP (RFC 7672): TLSA records of an MX host and matching them on a TLS chain.

Only DNSSEC-validated answers count: the MX RRset and the TLSA RRset ``_25._tcp.HOST``
must both come back with the AD bit from a trusted resolver (``dns_dnssec_trusted``, see
``mailgate.core.dns``). What the records say:

- usable records are DANE-TA(2) and DANE-EE(3), selector Cert(0) or SPKI(1), matching
  Full(0), SHA2-256(1) or SHA2-512(2) with the right length; PKIX-TA(0)/PKIX-EE(1) and
  anything unknown are unusable (section 3.1.3);
- at least one usable record: TLS is mandatory and the chain must match (else a
  temporary failure for that host, never clear text);
- only unusable records: opportunistic TLS, as without DANE.

Matching (section 3.1): DANE-EE compares the server's own certificate and ignores its
names and dates; DANE-TA looks for the record in the presented chain (the server must
send its trust anchor, section 3.2.1), checks every signature from the leaf up to it and
the certificates' dates, and requires the leaf to name the MX host or the next-hop domain
(section 3.2.3). A DANE-TA record of selector 1 matches a public key only when the
certificate carrying it is in the chain.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

_DIGEST_SIZES = {0: None, 1: 32, 2: 64}


@dataclass(frozen=True, slots=True)
class Tlsa:
    usage: int
    selector: int
    matching: int
    data: bytes

    @property
    def usable(self) -> bool:
        """Whether RFC 7672 lets SMTP use the record (section 3.1.3)."""
        if self.usage not in (2, 3) or self.selector not in (0, 1):
            return False
        if self.matching not in _DIGEST_SIZES:
            return False
        size = _DIGEST_SIZES[self.matching]
        return size is None or len(self.data) == size

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"


def parse_tlsa(text: str) -> Tlsa | None:
    """A TLSA record from its presentation form (``3 1 1 ABCD...``); None if malformed."""
    parts = text.split()
    if len(parts) < 4 or not all(p.isdigit() for p in parts[:3]):
        return None
    try:
        data = bytes.fromhex("".join(parts[3:]))
    except ValueError:
        return None
    return Tlsa(int(parts[0]), int(parts[1]), int(parts[2]), data)


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == 0:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def record_matches(record: Tlsa, cert: x509.Certificate) -> bool:
    data = _selected(cert, record.selector)
    if record.matching == 1:
        data = hashlib.sha256(data).digest()
    elif record.matching == 2:
        data = hashlib.sha512(data).digest()
    return data == record.data


def tlsa_for(cert: x509.Certificate, usage: int = 3, selector: int = 1, matching: int = 1) -> Tlsa:
    """The TLSA record that matches ``cert`` (for tests and for operators' tooling)."""
    data = _selected(cert, selector)
    if matching == 1:
        data = hashlib.sha256(data).digest()
    elif matching == 2:
        data = hashlib.sha512(data).digest()
    return Tlsa(usage, selector, matching, data)


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return [name.lower() for name in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return [str(attr.value).lower() for attr in common]


def name_matches(cert: x509.Certificate, references: list[str]) -> bool:
    """RFC 7672 section 3.2.3: a DNS-ID equal to a reference, or ``*.`` for its first label."""
    wanted = [ref.lower().rstrip(".") for ref in references]
    for name in _names(cert):
        name = name.rstrip(".")
        for ref in wanted:
            if name == ref:
                return True
            if name.startswith("*.") and "." in ref and ref.split(".", 1)[1] == name[2:]:
                return True
    return False


def _current(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def verify_chain(records: list[Tlsa], chain_der: list[bytes], references: list[str]) -> str | None:
    """Why the chain (leaf first) matches no usable record, or None when one matches."""
    usable = [r for r in records if r.usable]
    if not chain_der:
        return "the server presented no certificate"
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError:
        return "the server's certificate cannot be parsed"
    leaf = chain[0]
    for record in usable:
        if record.usage == 3 and record_matches(record, leaf):
            return None  # DANE-EE: the key or certificate is the proof; no name, no dates
    now = datetime.datetime.now(datetime.UTC)
    ta_problem = ""
    for record in usable:
        if record.usage != 2:
            continue
        for depth, cert in enumerate(chain):
            if not record_matches(record, cert):
                continue
            problem = _chain_to(chain, depth, now)
            if problem is None and not name_matches(leaf, references):
                problem = f"the certificate names none of {', '.join(references)}"
            if problem is None:
                return None
            ta_problem = problem
    if ta_problem:
        return f"DANE-TA: {ta_problem}"
    return "no TLSA record matches the server's certificate chain"


def _chain_to(chain: list[x509.Certificate], depth: int, now: datetime.datetime) -> str | None:
    """Why leaf..chain[depth] is not a valid chain (signatures, dates), or None."""
    for index in range(depth + 1):
        if not _current(chain[index], now):
            return f"certificate {index} in the chain is expired or not yet valid"
    for index in range(depth):
        child, issuer = chain[index], chain[index + 1]
        try:
            child.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            return f"certificate {index} is not signed by certificate {index + 1}"
    return None
