"""dkimpy's RSA done by OpenSSL (milters/dkim_rsa.py) gives exactly dkimpy's own answers."""

from __future__ import annotations

import hashlib

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailgate.milters import dkim_rsa

MESSAGE = (
    b"From: Alice <alice@example.test>\r\nTo: bob@example.test\r\nSubject: hello\r\n"
    b"Date: Wed, 25 Nov 2026 12:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\n"
    + b"A line of text.\r\n"
    * 200
)


def _key(bits: int) -> tuple[bytes, dict[str, int], bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, dkim.crypto.parse_pem_private_key(pem), public


@pytest.fixture(scope="module")
def keys() -> dict[int, tuple[bytes, dict[str, int], bytes]]:
    return {bits: _key(bits) for bits in (1024, 2048)}


@pytest.mark.parametrize("bits", [1024, 2048])
@pytest.mark.parametrize("algorithm", ["sha256", "sha1"])
def test_signatures_are_byte_for_byte_dkimpys(keys, bits: int, algorithm: str) -> None:
    _, private, public_der = keys[bits]
    public = dkim.crypto.parse_public_key(public_der)
    for index in range(5):
        digest = hashlib.new(algorithm, MESSAGE + bytes([index]))
        ours = dkim_rsa.sign(digest.copy(), private)
        theirs = dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest.copy(), private)
        assert bytes(ours) == bytes(theirs)
        assert dkim_rsa.verify(digest.copy(), bytes(ours), public)
        assert dkim.crypto.RSASSA_PKCS1_v1_5_verify(digest.copy(), bytes(ours), public)


def test_verification_agrees_with_dkimpy_on_bad_signatures(keys) -> None:
    _, private, public_der = keys[2048]
    public = dkim.crypto.parse_public_key(public_der)
    digest = hashlib.sha256(MESSAGE)
    good = bytes(dkim_rsa.sign(digest.copy(), private))
    other = hashlib.sha256(MESSAGE + b"changed")
    flipped = bytes([good[0] ^ 1]) + good[1:]
    refused = [(other, good), (digest, flipped)]  # another message; a damaged signature
    # Lengths OpenSSL would not take: dkimpy's own code answers, as before.
    odd = [(digest, good[1:]), (digest, b"\x00" + good), (digest, b"")]
    for hashed, signature in refused + odd:
        theirs = dkim.crypto.RSASSA_PKCS1_v1_5_verify(hashed.copy(), signature, public)
        assert dkim_rsa.verify(hashed.copy(), signature, public) is theirs
    for hashed, signature in refused:
        assert dkim_rsa.verify(hashed.copy(), signature, public) is False


def test_a_key_openssl_refuses_falls_back_to_dkimpy(keys) -> None:
    _, private, _ = keys[1024]
    broken = dict(private, prime1=private["prime1"] + 2)  # not a valid key any more
    digest = hashlib.sha256(MESSAGE)
    assert bytes(dkim_rsa.sign(digest.copy(), broken)) == bytes(
        dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest.copy(), broken)
    )


def test_dkimpy_signs_and_verifies_through_openssl(keys) -> None:
    import base64

    import mailgate.milters.dkim  # noqa: F401  (installs the OpenSSL primitives)

    assert dkim.RSASSA_PKCS1_v1_5_sign is dkim_rsa.sign
    assert dkim.RSASSA_PKCS1_v1_5_verify is dkim_rsa.verify
    pem, _, public_der = keys[2048]
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public_der)

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes:
        assert (name.decode() if isinstance(name, bytes) else name).startswith("s1._domainkey.")
        return record

    signature = dkim.sign(MESSAGE, b"s1", b"example.test", pem)
    assert dkim.verify(signature + MESSAGE, dnsfunc=dnsfunc)
    assert not dkim.verify(signature + MESSAGE.replace(b"hello", b"HELLO"), dnsfunc=dnsfunc)
