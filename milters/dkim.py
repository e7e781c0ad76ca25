"""The DKIM daemon (``mailgate milter dkim``): verifies every signature, signs outgoing mail.

A drop-in replacement for OpenDKIM. At end of message:

- **verification** (RFC 6376, RSA-SHA256 and Ed25519-SHA256 per RFC 8463, with dkimpy):
  every DKIM-Signature field, up to ``max_signatures``, is verified on its own; the facts
  (``dkim``, ``dkim_result``, ``dkim_pass_domains`` ...) are lazy, so rules placed before
  the first rule that asks (authenticated users) cost no key lookup. Each key is looked up
  through the process's cached resolver (``mailgate.core.dns``); a DNS failure is a
  ``temperror``, never a pass or a fail;
- **signing**, after the rules: a message the settings select (an authenticated client, a
  client in ``sign.networks``) or a rule selects (``X-Mailgate-DKIM-Sign: yes``), whose
  From domain has keys, and whose verdict lets it through, is signed with every active
  key of the domain (two selectors at once during a key rotation). The signature covers
  the headers as they leave, the rules' changes included, and is inserted on top.

The header values are kept as the MTA sent them (``SMFIP_HDR_LEADSPC`` is asked for when
offered), so a ``simple`` header canonicalization verifies too. The decision logic and the
header texts are in ``mailgate.policies.dkim``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import dkim  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.util import parse_tag_value  # type: ignore[import-untyped]

from mailgate.core.dns import DnsTempError, Resolver, resolver_for
from mailgate.milters import dkim_rsa
from mailgate.milters.raw_headers import RawHeaderMilter
from mailgate.policies.authresults import forged_removals
from mailgate.policies.dkim import (
    FACTS,
    KeySettings,
    Settings,
    SignatureResult,
    active_keys,
    apply_changes,
    authentication_results,
    clean,
    selected,
    sign_control,
    signed_fields,
    signing_domain,
)
from mailgate.policies.dkim import (
    facts as result_facts,
)
from mailgate.policies.facts import LazyFact, MessageFacts
from mailgate.policies.verdict import HeaderChange, Verdict

# RSA by OpenSSL for every signature this process makes or checks (dkim, arc, dmarc).
dkim_rsa.install()

# Signing and verifying need the whole body; above the core's default max_message_size.
DKIM_BODY_LIMIT = 32 * 1024 * 1024


# -- keys -----------------------------------------------------------------------------------


class KeyFileError(Exception):
    """A private key file that cannot be used."""


@dataclass(frozen=True, slots=True)
class LoadedKey:
    """A private key in the forms dkimpy and DNS need."""

    algorithm: str  # "rsa-sha256" or "ed25519-sha256"
    private: bytes  # what dkimpy's sign() takes (PKCS#1 PEM, or the base64 Ed25519 seed)
    public: str  # the p= value of the DNS record (base64)
    bits: int


def parse_private_key(data: bytes, name: str = "key") -> LoadedKey:
    """A PEM private key (PKCS#8 or PKCS#1 RSA, PKCS#8 Ed25519), or dkimpy's base64 seed."""
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{name}: not a usable PEM private key ({exc})") from None
        if isinstance(key, rsa.RSAPrivateKey):
            private = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
            public = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return LoadedKey("rsa-sha256", private, base64.b64encode(public).decode(), key.key_size)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            seed = key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            return _ed25519(seed)
        raise KeyFileError(f"{name}: only RSA and Ed25519 keys sign DKIM")
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{name}: neither a PEM key nor a base64 Ed25519 key") from None
    if len(seed) != 32:
        raise KeyFileError(f"{name}: a base64 Ed25519 key is 32 bytes, this is {len(seed)}")
    return _ed25519(seed)


def _ed25519(seed: bytes) -> LoadedKey:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return LoadedKey(
        "ed25519-sha256", base64.b64encode(seed), base64.b64encode(public).decode(), 256
    )


_KEYS: dict[Path, tuple[tuple[int, int], LoadedKey]] = {}
_KEYS_LOCK = threading.Lock()


def load_key(path: Path) -> LoadedKey:
    """The key in ``path``, read again only when the file changed (a rotation in place)."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    stamp = (stat.st_mtime_ns, stat.st_size)
    with _KEYS_LOCK:
        cached = _KEYS.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    loaded = parse_private_key(data, str(path))
    with _KEYS_LOCK:
        _KEYS[path] = (stamp, loaded)
    return loaded


def key_algorithm(key: KeySettings, loaded: LoadedKey) -> str:
    if key.algorithm is not None and key.algorithm != loaded.algorithm:
        raise KeyFileError(f"{key.key}: an {loaded.algorithm} key, but algorithm: {key.algorithm}")
    return loaded.algorithm


# -- DNS ------------------------------------------------------------------------------------


class KeyLookupError(Exception):
    """The key record could not be looked up this time (temperror)."""


def make_dnsfunc(resolver: Resolver, deadline: float) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc``: the TXT record of a name through mailgate's resolver.

    Returns the record (its strings joined), None when there is none; raises
    KeyLookupError when DNS gave no answer, so the caller reports a temperror.
    """

    def dnsfunc(name: bytes | str, timeout: float = 5.0) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        text = text.rstrip(".")
        left = deadline - time.monotonic()
        if left <= 0:
            raise KeyLookupError(f"{text}: no time left for the lookup")
        try:
            answer = resolver.query(text, "TXT", timeout=min(float(timeout), left))
        except DnsTempError as exc:
            raise KeyLookupError(f"{text}: {exc.why}") from exc
        if answer.status != "ok" or not answer.txt:
            return None
        # Several records at one name are an error of the domain (RFC 6376 3.6.2.2 leaves it
        # undefined); take the one that looks like a key.
        for record in answer.txt:
            if b"p=" in record:
                return record
        return answer.txt[0]

    return dnsfunc


# -- verification ---------------------------------------------------------------------------


def _tag(sig: dict[bytes, bytes], name: bytes) -> str:
    return sig.get(name, b"").decode("ascii", "replace").strip()


def _signature_tags(value: bytes) -> dict[bytes, bytes]:
    try:
        return dict(parse_tag_value(value))
    except Exception:  # a garbled field is reported by the verification itself
        return {}


def verify_message(
    message: bytes,
    settings: Settings,
    dnsfunc: Callable[..., bytes | None],
    *,
    body_complete: bool = True,
) -> list[SignatureResult]:
    """Every DKIM-Signature of ``message`` verified on its own, in header order."""
    try:
        verifier = dkim.DKIM(message, minkey=settings.min_key_bits, timeout=settings.timeout)
        headers = verifier.headers
    except Exception as exc:
        # A message dkimpy cannot parse: each signature it has is a permerror.
        count = sum(
            1
            for line in message.split(b"\r\n\r\n", 1)[0].split(b"\n")
            if line.lower().startswith(b"dkim-signature:")
        )
        reason = clean(f"message not parsable: {exc}")
        return [SignatureResult("permerror", reason=reason) for _ in range(count)]
    count = sum(1 for name, _ in headers if name.lower() == b"dkim-signature")
    results = []
    for index in range(count):
        if index >= settings.max_signatures:
            tags = _signature_tags([v for n, v in headers if n.lower() == b"dkim-signature"][index])
            results.append(
                SignatureResult(
                    "policy",
                    domain=_tag(tags, b"d").lower(),
                    selector=_tag(tags, b"s"),
                    algorithm=_tag(tags, b"a"),
                    reason=f"more than {settings.max_signatures} signatures; not verified",
                )
            )
            continue
        if not body_complete:
            results.append(SignatureResult("policy", reason="message over the body limit"))
            continue
        results.append(_verify_one(verifier, index, settings, dnsfunc))
    return results


def _verify_one(
    verifier: dkim.DKIM, index: int, settings: Settings, dnsfunc: Callable[..., bytes | None]
) -> SignatureResult:
    raw = [v for n, v in verifier.headers if n.lower() == b"dkim-signature"][index]
    tags = _signature_tags(raw)
    base = SignatureResult(
        "permerror",
        domain=_tag(tags, b"d").lower(),
        selector=_tag(tags, b"s"),
        algorithm=_tag(tags, b"a").lower(),
        identity=_tag(tags, b"i"),
        b_prefix="".join(_tag(tags, b"b").split())[:8],
    )

    def result(outcome: Any, reason: str) -> SignatureResult:
        return dataclasses.replace(base, result=outcome, reason=clean(reason))

    try:
        prep = verifier.verify_headerprep(index)
    except dkim.DKIMException as exc:
        return result("permerror", f"signature: {exc}")
    except Exception as exc:
        return result("permerror", f"signature not parsable: {type(exc).__name__}")
    if not prep:
        return result("permerror", "signature not found")
    sig, include_headers, sigheaders = prep
    if sig.get(b"a", b"").lower() == b"rsa-sha1":
        return result("policy", "rsa-sha1 signatures are not accepted (RFC 8301)")
    name = f"{base.selector}._domainkey.{base.domain}"
    try:
        record = dnsfunc(name.encode("ascii", "replace"), timeout=settings.dns.timeout)
    except KeyLookupError as exc:
        return result("temperror", f"key lookup failed: {exc}")
    if record is None:
        return result("permerror", f"no key for signature at {name}")
    try:
        key_tags = dict(parse_tag_value(record))
    except Exception:
        return result("permerror", f"key record at {name} is not a tag list")
    if b"p" not in key_tags:
        return result("permerror", f"key record at {name} has no p=")
    if not key_tags[b"p"].strip():
        # RFC 6376 3.6.1: an empty p= means the key was revoked.
        return result("fail", f"key {name} revoked")
    hashes = key_tags.get(b"h")
    if hashes is not None and b"sha256" not in [h.strip().lower() for h in hashes.split(b":")]:
        return result("permerror", f"key {name} does not allow sha256 (h=)")
    try:
        pk, keysize, ktag, seqtlsrpt = dkim.evaluate_pk(name, record)
    except (dkim.DKIMException, binascii.Error, ValueError, TypeError) as exc:
        return result("permerror", f"bad key at {name}: {exc}")
    if pk is None:
        return result("permerror", f"key {name} is not for email (s=)")
    wanted = b"ed25519" if base.algorithm.startswith("ed25519") else b"rsa"
    if ktag != wanted:
        return result("permerror", f"key {name} is {ktag.decode()}, signature {base.algorithm}")
    if ktag == b"rsa" and keysize < settings.min_key_bits:
        return result("policy", f"key {name} is {keysize} bits, under {settings.min_key_bits}")
    verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = pk, keysize, ktag, seqtlsrpt
    try:
        verified = verifier.verify_sig_process(sig, include_headers, sigheaders[index], dnsfunc)
    except dkim.ValidationError as exc:
        if "body hash mismatch" in str(exc):
            return result("fail", "body hash did not verify")
        return result("permerror", f"signature: {exc}")
    except dkim.DKIMException as exc:
        return result("permerror", f"signature: {exc}")
    except Exception as exc:
        return result("permerror", f"signature not verifiable: {type(exc).__name__}: {exc}")
    if not verified:
        return result("fail", "signature did not verify")
    return result("pass", f"{keysize}-bit key" if ktag == b"rsa" else "ed25519 key")


# -- signing --------------------------------------------------------------------------------


def sign_message(
    message: bytes,
    domain: str,
    selector: str,
    loaded: LoadedKey,
    algorithm: str,
    include: Sequence[str],
    canonicalization: str,
) -> str:
    """The value of a DKIM-Signature field for ``message`` (folded with LF, as milters send)."""
    signer = dkim.DKIM(message, linesep=b"\n", minkey=512)
    header, body = canonicalization.split("/")
    signature = signer.sign(
        selector.encode("ascii"),
        domain.encode("ascii"),
        loaded.private,
        signature_algorithm=algorithm.encode("ascii"),
        canonicalize=(header.encode("ascii"), body.encode("ascii")),
        include_headers=[name.encode("ascii") for name in include],
    )
    prefix = b"DKIM-Signature:"
    value: bytes = signature[len(prefix) :] if signature.startswith(prefix) else signature
    return value.strip().decode("ascii")


def wire_message(headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bytes:
    """``name:value`` lines (values as on the wire, leading space included) and the body."""
    head = b"".join(name + b":" + value + b"\r\n" for name, value in headers)
    return head + b"\r\n" + body


# -- the daemon -----------------------------------------------------------------------------


class Verification:
    """The verification of one message, run once, when first asked for."""

    def __init__(
        self,
        settings: Settings,
        message: bytes,
        body_complete: bool,
        log: Callable[[SignatureResult], None],
    ) -> None:
        self.settings = settings
        self.message = message
        self.body_complete = body_complete
        self.log = log
        self._lock = threading.Lock()
        self.results: list[SignatureResult] | None = None

    @property
    def computed(self) -> bool:
        return self.results is not None

    def run(self) -> list[SignatureResult]:
        with self._lock:
            if self.results is None:
                dnsfunc = make_dnsfunc(
                    resolver_for(self.settings.dns), time.monotonic() + self.settings.timeout
                )
                self.results = verify_message(
                    self.message, self.settings, dnsfunc, body_complete=self.body_complete
                )
                for item in self.results:
                    self.log(item)
            return self.results

    def lazy_facts(self) -> dict[str, LazyFact]:
        return {
            name: LazyFact(lambda name=name: result_facts(self.run())[name])  # type: ignore[misc]
            for name in FACTS
        }


class DkimMilter(RawHeaderMilter):
    """One MTA connection of the dkim daemon."""

    body_limit: ClassVar[int] = DKIM_BODY_LIMIT

    def _reset_message(self) -> None:
        super()._reset_message()
        self.verification: Verification | None = None
        self.settings: Settings = Settings()

    def _current_settings(self) -> Settings:
        settings = getattr(self.context.policy.current, "settings", None)
        return settings if isinstance(settings, Settings) else Settings()

    def _wire_headers(self) -> list[tuple[bytes, bytes]]:
        return self.received_headers()

    def _logged(self, item: SignatureResult) -> None:
        self.logger.info(
            "%s: DKIM %s d=%s s=%s a=%s%s",
            self.qid,
            item.result,
            item.domain or "-",
            item.selector or "-",
            item.algorithm or "-",
            f" ({item.reason})" if item.result != "pass" else "",
        )

    # -- the decision ------------------------------------------------------------------

    def prepare(self, facts: MessageFacts) -> None:
        self.settings = self._current_settings()
        body_complete = self._body_received <= len(self._body)
        message = wire_message(self._wire_headers(), bytes(self._body))
        self.verification = Verification(self.settings, message, body_complete, self._logged)
        facts.extra.update(self.verification.lazy_facts())
        if selected(self.settings, facts.auth_user, facts.client_ip):
            domain = signing_domain(self.settings, facts.headers)
            if domain is not None:
                facts.extra["dkim_sign"] = domain

    def decide(self, facts: MessageFacts) -> Verdict:
        verdict = super().decide(facts)
        wanted, verdict.header_changes = sign_control(verdict.header_changes)
        if verdict.action in ("reject", "tempfail", "discard"):
            return verdict
        settings = self.settings
        verification = self.verification
        assert verification is not None
        by_settings = selected(settings, facts.auth_user, facts.client_ip)
        signing = wanted if wanted is not None else by_settings
        if settings.authentication_results:
            removals = forged_removals(facts.headers, settings.server_id)
            if removals:
                self.logger.info(
                    "%s: removing %d forged Authentication-Results header%s claiming %s",
                    self.qid,
                    len(removals),
                    "" if len(removals) == 1 else "s",
                    settings.server_id,
                )
            verdict.header_changes[:0] = removals
            # Outgoing mail (signed here) and mail a rule accepted before asking (our own
            # users) are verified only if a rule asked.
            if verification.computed or not (signing or verdict.action == "accept"):
                verdict.header_changes.append(
                    HeaderChange(
                        op="insert",
                        name="Authentication-Results",
                        value=authentication_results(verification.run(), settings.server_id),
                        index=0,
                    )
                )
        if wanted is False and by_settings:
            self.logger.info("%s: not signed: a rule said no", self.qid)
        if signing:
            failure = self._sign(facts, verdict)
            if failure is not None:
                return failure
        return self.spaced(verdict)

    def _sign(self, facts: MessageFacts, verdict: Verdict) -> Verdict | None:
        """Add this message's signatures to ``verdict``; a tempfail verdict if it cannot."""
        settings = self.settings
        # What leaves: the headers after the rules' changes (a tagged Subject is signed as
        # tagged), without the Authentication-Results we add (never signed).
        headers = apply_changes(self._wire_headers(), verdict.header_changes)
        text_headers = [
            (name.decode("ascii", "replace"), value.decode("utf-8", "replace").strip())
            for name, value in headers
        ]
        domain = signing_domain(settings, text_headers)
        if domain is None:
            self.logger.debug("%s: not signed: no key for the From domain", self.qid)
            return None
        keys = active_keys(settings, domain)
        problems: list[str] = []
        if self._body_received > len(self._body):
            problems.append(f"the body is over the limit of {self.context.body_limit} bytes")
            keys = []
        message = wire_message(headers, bytes(self._body))
        include = signed_fields(settings, text_headers)
        signatures: list[HeaderChange] = []
        for key in keys:
            try:
                loaded = load_key(key.key)
                algorithm = key_algorithm(key, loaded)
                value = sign_message(
                    message,
                    domain,
                    key.selector,
                    loaded,
                    algorithm,
                    include,
                    settings.canonicalization,
                )
            except (KeyFileError, dkim.DKIMException) as exc:
                problems.append(f"d={domain} s={key.selector}: {exc}")
                continue
            self.logger.info(
                "%s: DKIM signed d=%s s=%s a=%s", self.qid, domain, key.selector, algorithm
            )
            signatures.append(
                HeaderChange(op="insert", name="DKIM-Signature", value=value, index=0)
            )
        for problem in problems:
            self.logger.error("%s: cannot sign: %s", self.qid, problem)
        if problems and settings.on_sign_error == "tempfail":
            return Verdict(
                action="tempfail",
                code=451,
                enhanced="4.3.0",
                text="DKIM signing failed; try again later",
                matched=verdict.matched,
            )
        # Inserted in reverse, the first key's signature ends on top.
        verdict.header_changes.extend(reversed(signatures))
        return None
