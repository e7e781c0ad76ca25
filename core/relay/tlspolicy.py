"""What TLS a receiving domain asks for, per MX host: DANE, MTA-STS or opportunistic.

The relay asks this module once per attempt for the destination domain (``domain``), then
once per MX host before connecting (``hop``). Routes (smarthosts) are not concerned: their
next hop is the operator's choice, with its own ``tls``/``tls_verify``.

Order (RFC 8461 section 2, RFC 7672): a host with usable DANE TLSA records gets DANE, which
overrides MTA-STS; otherwise the domain's MTA-STS policy in ``enforce`` mode limits the
hosts to its ``mx`` patterns and requires STARTTLS with a WebPKI-valid certificate for the
host's name; ``testing`` mode checks the same but delivers anyway; otherwise TLS stays
opportunistic. A requirement that is not met is a temporary failure of that host
(``RelayError`` with 4.7.x): the relay tries the next host and never falls back to clear
text or to an unchecked certificate.

Every TLS session to an MX host is counted for TLS-RPT (RFC 8460) in ``tls.sqlite3``
(``mailgate.core.relay.tlsstore``), with the failure's result type.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import ssl
import time
from dataclasses import dataclass, field, replace

from mailgate.core.config import Config
from mailgate.core.dns import DnsTempError, Resolver
from mailgate.core.errors import RelayError
from mailgate.core.relay.client import SmtpClient, client_context
from mailgate.core.relay.dane import Tlsa, parse_tlsa, verify_chain
from mailgate.core.relay.mtasts import StsError, StsPolicy, StsResolver
from mailgate.core.relay.mx import Hop
from mailgate.core.relay.tlsstore import Session, TlsStore

log = logging.getLogger("mailgate.relay")


class PolicyCheck:
    """The client's TLS hook (``SmtpClient.connect(tls_policy=...)``) for one host."""

    def __init__(
        self,
        context: ssl.SSLContext,
        server_name: str,
        records: tuple[Tlsa, ...] = (),
        references: tuple[str, ...] = (),
    ) -> None:
        self.context = context
        self.server_name = server_name
        self._records = list(records)
        self._references = list(references)

    def check(self, ssl_object: ssl.SSLObject | None) -> str | None:
        """Why the session does not satisfy the policy, or None (WebPKI: the handshake did)."""
        if not self._records:
            return None
        if ssl_object is None:
            return "DANE: no TLS session"
        return verify_chain(self._records, peer_chain(ssl_object), self._references)


def peer_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the server presented (DER, leaf first)."""
    inner = getattr(ssl_object, "_sslobj", None)
    # Python 3.10-3.12 have the chain only on the private object (public from 3.13).
    getter = getattr(ssl_object, "get_unverified_chain", None) or getattr(
        inner, "get_unverified_chain", None
    )
    if getter is not None:
        chain = getter() or []
        return [
            cert if isinstance(cert, bytes) else cert.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
            for cert in chain
        ]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


@dataclass(frozen=True, slots=True)
class DomainTls:
    """The policies of one destination domain, found at the start of an attempt."""

    domain: str
    sts: StsPolicy | None = None
    sts_error: StsError | None = None
    # DANE needs a validated MX RRset; its hosts are then the only ones DANE may apply to.
    secure_hosts: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class HopTls:
    """What one host must offer: ``kind`` and the hook for the client."""

    kind: str  # "dane", "sts-enforce", "sts-testing", "opportunistic"
    session: Session
    check: PolicyCheck | None = None
    # False when the session was already counted as a failure (testing mode, MX mismatch).
    report: bool = field(default=True)


def result_type(reason: str) -> str:
    """The RFC 8460 result type of a WebPKI failure, from OpenSSL's message."""
    text = reason.lower()
    if "hostname mismatch" in text or "ip address mismatch" in text:
        return "certificate-host-mismatch"
    if "expired" in text or "not yet valid" in text:
        return "certificate-expired"
    if "certificate" in text and ("verify" in text or "issuer" in text or "self" in text):
        return "certificate-not-trusted"
    return "validation-failure"


class TlsPolicies:
    """MTA-STS, DANE and TLS-RPT for the relay; one per ``RelayAgent``."""

    def __init__(
        self,
        resolver: Resolver,
        store: TlsStore | None,
        *,
        sts: StsResolver | None,
        dane: bool,
        report: bool,
    ) -> None:
        self._resolver = resolver
        self._store = store
        self._sts = sts
        self._dane = dane and resolver.trust_ad
        self._report = report and store is not None
        self._opportunistic = client_context(False)

    @classmethod
    def from_config(cls, config: Config, resolver: Resolver) -> TlsPolicies | None:
        if config.relay_tls == "none":
            return None
        wanted = config.relay_mta_sts or config.relay_dane or config.tls_rpt
        store = TlsStore(config.tls_db) if wanted else None
        sts = None
        if config.relay_mta_sts and store is not None:
            sts = StsResolver(
                resolver,
                store,
                timeout=config.mta_sts_fetch_timeout,
                ca_file=config.mta_sts_ca_file,
                port=config.mta_sts_https_port,
            )
        return cls(resolver, store, sts=sts, dane=config.relay_dane, report=config.tls_rpt)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    # -- policies ---------------------------------------------------------------------

    async def domain(self, domain: str) -> DomainTls:
        sts, error = (None, None)
        if self._sts is not None:
            sts, error = await self._sts.policy(domain)
        secure: frozenset[str] | None = None
        if self._dane:
            try:
                answer = await asyncio.to_thread(self._resolver.query, domain, "MX", dnssec=True)
            except DnsTempError:
                answer = None
            if answer is not None and answer.authentic:
                hosts = [host.lower() for _, host in answer.mx if host not in (".", "")]
                # No MX (a validated NODATA): the domain is its own MX (RFC 7672 2.2.1).
                secure = frozenset(hosts or [domain.lower()])
        return DomainTls(domain, sts, error, secure)

    async def hop(self, policy: DomainTls, hop: Hop) -> HopTls:
        """The requirement for ``hop``; RelayError when the host may not be used at all."""
        host = hop.host.lower().rstrip(".")
        if policy.secure_hosts is not None and host not in policy.secure_hosts:
            # Both MX answers come from the same trusted resolver, so a host missing from
            # the validated set can only come from a forged (unvalidated) reply.
            raise RelayError(
                f"{hop.host} is not in the DNSSEC-validated MX set of {policy.domain}",
                status="4.7.5",
            )
        if policy.secure_hosts is not None:
            records = await self._tlsa(host)
            usable = tuple(r for r in records if r.usable)
            if usable:
                session = Session(policy.domain, "tlsa", tuple(str(r) for r in records), host)
                check = PolicyCheck(
                    self._opportunistic, host, usable, (host, policy.domain.lower())
                )
                return HopTls("dane", session, check)
            if records:
                # Section 2.2: only unusable records: opportunistic TLS, without MTA-STS.
                session = Session(policy.domain, "no-policy-found", (), host)
                return HopTls("opportunistic", session)
        sts = policy.sts
        if sts is not None and sts.mode in ("enforce", "testing"):
            session = Session(policy.domain, "sts", sts.lines, ",".join(sts.mx))
            if not sts.matches(host):
                self.count(
                    replace(
                        session,
                        result_type="validation-failure",
                        receiving_mx=host,
                        receiving_ip=hop.address,
                        reason="mx-not-in-policy",
                    )
                )
                if sts.mode == "enforce":
                    raise RelayError(
                        f"{hop.host} is not an MX host allowed by the MTA-STS policy of "
                        f"{policy.domain}",
                        status="4.7.5",
                    )
                return HopTls("opportunistic", session, report=False)
            assert self._sts is not None
            check = PolicyCheck(self._sts.context, host)
            return HopTls(f"sts-{sts.mode}", session, check)
        if policy.sts_error is not None:
            error = policy.sts_error
            session = Session(policy.domain, "sts", (), "")
            self.count(replace(session, result_type=error.result_type, reason=str(error)[:200]))
        return HopTls("opportunistic", Session(policy.domain, "no-policy-found", (), host))

    async def _tlsa(self, host: str) -> list[Tlsa]:
        try:
            answer = await asyncio.to_thread(
                self._resolver.query, f"_25._tcp.{host}", "TLSA", dnssec=True
            )
        except DnsTempError as exc:
            # RFC 7672 section 2.2: a secure host whose TLSA lookup fails is not used now.
            raise RelayError(f"TLSA lookup for {host} failed: {exc.why}", status="4.7.5") from None
        if not answer.authentic or answer.status != "ok":
            return []
        parsed = [parse_tlsa(text) for text in answer.records]
        return [record for record in parsed if record is not None]

    # -- TLS-RPT ------------------------------------------------------------------------

    def count(self, session: Session) -> None:
        if not self._report or self._store is None:
            return
        try:
            self._store.count(session, time.time())
        except (sqlite3.Error, OSError) as exc:  # a report count never stops mail
            log.warning("TLS-RPT: cannot record a session: %s", exc)

    def connected(self, hop_tls: HopTls, hop: Hop, client: SmtpClient) -> None:
        """Count a session that was set up (TLS or not, as the policy allowed)."""
        if not hop_tls.report:
            return
        session = replace(
            hop_tls.session,
            sending_ip=client.local_address,
            receiving_mx=hop.host,
            receiving_ip=hop.address,
        )
        if not client.tls:
            session = replace(session, result_type="starttls-not-supported")
        self.count(session)

    def failed(self, hop_tls: HopTls, hop: Hop, exc: RelayError) -> None:
        """Count a session that the policy refused (or that TLS could not set up)."""
        if exc.status not in ("4.7.4", "4.7.5"):
            return  # not about TLS: a refused connection, a 4xx greeting
        text = str(exc)
        if exc.status == "4.7.4":
            kind = "starttls-not-supported"
        elif hop_tls.kind == "dane":
            kind = "validation-failure"  # RFC 8460: no TLSA record matched the chain
        else:
            kind = result_type(text)
        self.count(
            replace(
                hop_tls.session,
                result_type=kind,
                receiving_mx=hop.host,
                receiving_ip=hop.address,
                reason=text[:200],
            )
        )
