"""RSA for dkimpy through OpenSSL: the same signatures, computed by the `cryptography` package.

dkimpy signs and verifies RSA with Python integers (``pow`` on 1024-bit primes): about
5 ms per RSA-2048 signature, where OpenSSL needs 0.2 ms (bench scenario G). RSASSA-PKCS1
v1.5 is deterministic, so OpenSSL's signature is byte for byte dkimpy's; this module
replaces dkimpy's two RSA primitives, for the DKIM, ARC and DMARC daemons alike, and
falls back to dkimpy's own code for anything OpenSSL refuses (a key too small for the
digest, a signature of the wrong length, a key OpenSSL will not load), so no message
verifies differently than before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import dkim  # type: ignore[import-untyped]
import dkim.crypto  # type: ignore[import-untyped]
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha1": hashes.SHA1,
}

_pure_sign: Callable[[Any, dict[str, int]], bytearray] = dkim.crypto.RSASSA_PKCS1_v1_5_sign
_pure_verify: Callable[[Any, bytes, dict[str, int]], bool] = dkim.crypto.RSASSA_PKCS1_v1_5_verify


@functools.lru_cache(maxsize=256)
def _private_key(
    n: int, e: int, d: int, p: int, q: int, dmp1: int, dmq1: int, iqmp: int
) -> rsa.RSAPrivateKey:
    public = rsa.RSAPublicNumbers(e, n)
    numbers = rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, public)
    return numbers.private_key()


@functools.lru_cache(maxsize=1024)
def _public_key(n: int, e: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(e, n).public_key()


def _modulus_bytes(n: int) -> int:
    return (n.bit_length() + 7) // 8


def sign(hash: Any, private_key: dict[str, int]) -> bytearray:
    """dkimpy's RSASSA_PKCS1_v1_5_sign, by OpenSSL."""
    algorithm = _HASHES.get(str(hash.name).lower())
    if algorithm is None:
        return _pure_sign(hash, private_key)
    try:
        key = _private_key(
            private_key["modulus"],
            private_key["publicExponent"],
            private_key["privateExponent"],
            private_key["prime1"],
            private_key["prime2"],
            private_key["exponent1"],
            private_key["exponent2"],
            private_key["coefficient"],
        )
        signature = key.sign(hash.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm()))
    except (ValueError, TypeError, KeyError):
        return _pure_sign(hash, private_key)
    return bytearray(signature)


def verify(hash: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    """dkimpy's RSASSA_PKCS1_v1_5_verify, by OpenSSL."""
    algorithm = _HASHES.get(str(hash.name).lower())
    modulus = public_key.get("modulus", 0)
    if algorithm is None or len(signature) != _modulus_bytes(modulus):
        return _pure_verify(hash, signature, public_key)
    try:
        key = _public_key(modulus, public_key["publicExponent"])
    except (ValueError, TypeError, KeyError):
        return _pure_verify(hash, signature, public_key)
    try:
        key.verify(
            bytes(signature), hash.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm())
        )
    except InvalidSignature:
        return False
    except (ValueError, TypeError):
        return _pure_verify(hash, signature, public_key)
    return True


def install() -> None:
    """Make dkimpy (its DKIM and ARC classes) sign and verify RSA through OpenSSL."""
    dkim.RSASSA_PKCS1_v1_5_sign = sign
    dkim.RSASSA_PKCS1_v1_5_verify = verify
