"""MTA-STS (RFC 8461): discovering, fetching, parsing and caching a domain's policy.

- Discovery: the TXT record ``_mta-sts.DOMAIN`` (``v=STSv1; id=...``), through the core's
  resolver (``mailgate.core.dns``) like every lookup.
- Fetch: ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``; the host's address comes from
  the same resolver, the certificate must be valid for ``mta-sts.DOMAIN`` (system trust
  store, or ``mta_sts_ca_file``), no redirect is followed, the status must be 200 with
  ``text/plain``, the body at most 64 KiB, and the whole fetch must end within
  ``mta_sts_fetch_timeout``. ``mta_sts_https_port`` moves the port, for tests only.
- Parsing: strict per section 3.2: ``version: STSv1`` first, ``mode``
  (enforce/testing/none), ``max_age`` (0 to 31557600), at least one ``mx`` unless the
  mode is ``none``; unknown keys are ignored, anything malformed rejects the policy.
- Cache (section 5.1): the last good policy of each domain stays in ``tls.sqlite3`` until
  its ``max_age`` runs out. The TXT id is compared on every delivery (the DNS cache keeps
  that cheap); a new id triggers a fetch, and a failed fetch keeps the cached policy. A
  missing TXT record, or a DNS failure, also keeps it: only its expiry or a new policy
  retires it (this is what stops an attacker who strips the TXT record).
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from mailgate.core.dns import DnsTempError, Resolver
from mailgate.core.relay.mx import host_addresses
from mailgate.core.relay.tlsstore import CachedPolicy, TlsStore

log = logging.getLogger("mailgate.relay")

MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 section 3.3: 64 KiB is the recommended bound
MAX_AGE_LIMIT = 31557600
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_MX_PATTERN = re.compile(r"^(\*\.)?([A-Za-z0-9_-]+\.)*[A-Za-z0-9_-]+\.?$")


class StsError(Exception):
    """No usable policy: ``result_type`` is the RFC 8460 name of the failure."""

    def __init__(self, message: str, result_type: str = "sts-policy-fetch-error") -> None:
        super().__init__(message)
        self.result_type = result_type


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A parsed policy (RFC 8461 section 3.2), with its text for TLS-RPT."""

    mode: str  # "enforce", "testing", "none"
    max_age: int
    mx: tuple[str, ...]
    text: str

    @property
    def lines(self) -> tuple[str, ...]:
        """The policy as TLS-RPT's ``policy-string``: one entry per line."""
        return tuple(line for line in self.text.replace("\r\n", "\n").split("\n") if line)

    def matches(self, host: str) -> bool:
        """Whether the MX host ``host`` is one the policy names (section 4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 section 4.1: exact, or ``*.`` standing for exactly one leftmost label."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


def parse_txt(records: list[bytes]) -> str | None:
    """The ``id`` of the domain's STSv1 TXT record; None when there is no single valid one."""
    found = [r for r in records if r.startswith(b"v=STSv1")]
    if len(found) != 1:
        return None  # section 3.1: none, or more than one, means no policy
    fields: dict[str, str] = {}
    for part in found[0].decode("ascii", "replace").split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, equals, value = part.partition("=")
        if not equals:
            return None
        fields.setdefault(key, value)
    if fields.get("v") != "STSv1" or not _ID.match(fields.get("id", "")):
        return None
    return fields["id"]


def parse_policy(text: str) -> StsPolicy:
    """A policy body (section 3.2); StsError("sts-policy-invalid") if it is malformed."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    first = True
    for raw in text.replace("\r\n", "\n").split("\n"):
        if not raw.strip():
            continue
        key, colon, value = raw.partition(":")
        key, value = key.strip(), value.strip(" \t")
        if not colon or not _KEY.match(key):
            raise StsError(f"malformed policy line {raw[:60]!r}", "sts-policy-invalid")
        if first and key != "version":
            raise StsError("the policy does not start with its version", "sts-policy-invalid")
        first = False
        if key == "mx":
            if not _MX_PATTERN.match(value):
                raise StsError(f"malformed mx pattern {value[:60]!r}", "sts-policy-invalid")
            mx.append(value.rstrip(".").lower())
        elif key in ("version", "mode", "max_age"):
            # A repeated field: the first one counts (section 3.2, as for unknown keys).
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise StsError("version is not STSv1", "sts-policy-invalid")
    mode = fields.get("mode", "")
    if mode not in ("enforce", "testing", "none"):
        raise StsError(f"invalid mode {mode[:20]!r}", "sts-policy-invalid")
    max_age = fields.get("max_age", "")
    if not (max_age.isdigit() and len(max_age) <= 10 and int(max_age) <= MAX_AGE_LIMIT):
        raise StsError(f"invalid max_age {max_age[:20]!r}", "sts-policy-invalid")
    if not mx and mode != "none":
        raise StsError("the policy names no mx", "sts-policy-invalid")
    return StsPolicy(mode, int(max_age), tuple(mx), text)


def https_context(ca_file: Path | None) -> ssl.SSLContext:
    """WebPKI validation for the policy host and MX hosts: system roots, or ``ca_file``."""
    if ca_file is not None:
        context = ssl.create_default_context(cafile=str(ca_file))
    else:
        context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _fetch_blocking(
    host: str, address: str, port: int, context: ssl.SSLContext, timeout: float
) -> str:
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        raise StsError(f"cannot connect to {host}[{address}]:{port}: {exc}") from None
    try:
        try:
            tls = context.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            raise StsError(f"{host}: {exc.verify_message}", "sts-webpki-invalid") from None
        except (OSError, ssl.SSLError) as exc:
            raise StsError(f"{host}: TLS handshake failed: {exc}") from None
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        connection.sock = tls  # the verified socket; http.client never follows redirects
        try:
            connection.request(
                "GET",
                "/.well-known/mta-sts.txt",
                headers={"Host": host if port == 443 else f"{host}:{port}", "Accept": "*/*"},
            )
            response = connection.getresponse()
            if response.status != 200:
                # Section 3.3: redirects are not followed; anything but 200 is no policy.
                raise StsError(f"{host}: HTTP {response.status} {response.reason}")
            content_type = (response.getheader("Content-Type") or "").split(";")[0].strip()
            if content_type.lower() != "text/plain":
                raise StsError(f"{host}: Content-Type {content_type!r}, not text/plain")
            body = b""
            while len(body) <= MAX_POLICY_SIZE:
                if time.monotonic() > deadline:
                    raise StsError(f"{host}: the policy fetch timed out")
                chunk = response.read(8192)
                if not chunk:
                    break
                body += chunk
            if len(body) > MAX_POLICY_SIZE:
                raise StsError(f"{host}: the policy is larger than {MAX_POLICY_SIZE} bytes")
        except (OSError, http.client.HTTPException) as exc:
            raise StsError(f"{host}: {type(exc).__name__}: {exc}") from None
        finally:
            connection.close()
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise StsError(f"{host}: the policy is not UTF-8", "sts-policy-invalid") from None
    finally:
        sock.close()


class StsResolver:
    """A domain's current MTA-STS policy, from the cache or the network."""

    def __init__(
        self,
        resolver: Resolver,
        store: TlsStore,
        *,
        timeout: float = 10.0,
        ca_file: Path | None = None,
        port: int = 443,
    ) -> None:
        self._resolver = resolver
        self._store = store
        self._timeout = timeout
        self._context = https_context(ca_file)
        self._port = port
        # One fetch per domain at a time: concurrent deliveries wait for the same fetch.
        self._fetching: dict[str, asyncio.Future[None]] = {}

    @property
    def context(self) -> ssl.SSLContext:
        return self._context

    async def fetch(self, domain: str) -> StsPolicy:
        """Fetch and parse ``domain``'s policy now (no cache); StsError if that fails."""
        host = f"mta-sts.{domain}"
        addresses, _ = await host_addresses(self._resolver, host)
        if not addresses:
            raise StsError(f"no address for {host}")
        problems: list[str] = []
        for address in addresses[:3]:
            try:
                text = await asyncio.wait_for(
                    asyncio.to_thread(
                        _fetch_blocking, host, address, self._port, self._context, self._timeout
                    ),
                    self._timeout,
                )
            except TimeoutError:
                problems.append(f"{host}[{address}]: timed out")
                continue
            except StsError as exc:
                if exc.result_type != "sts-policy-fetch-error":
                    raise
                problems.append(str(exc))
                continue
            return parse_policy(text)
        raise StsError("; ".join(problems))

    async def policy(self, domain: str) -> tuple[StsPolicy | None, StsError | None]:
        """The policy to apply to ``domain`` now, and the failure to report if any.

        (None, None): the domain has no policy. (None, error): it announces one that could
        not be had and none is cached (delivery goes on as without a policy, section 5.1).
        """
        now = time.time()
        cached = await asyncio.to_thread(self._store.policy, domain)
        if cached is not None and cached.expires <= now:
            cached = None
        try:
            answer = await asyncio.to_thread(self._resolver.query, f"_mta-sts.{domain}", "TXT")
            policy_id = parse_txt(list(answer.txt)) if answer.status == "ok" else None
        except DnsTempError:
            policy_id = None
        if policy_id is None or (cached is not None and cached.id == policy_id):
            return (_parse_cached(cached), None) if cached is not None else (None, None)
        running = self._fetching.get(domain)
        if running is not None:
            await asyncio.shield(running)
            return await self.policy(domain)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fetching[domain] = done
        try:
            try:
                policy = await self.fetch(domain)
            except StsError as exc:
                log.warning("MTA-STS policy of %s: %s", domain, exc)
                # Keep applying a policy still valid (section 5.1); else none is in force.
                return (_parse_cached(cached) if cached else None), exc
            entry = CachedPolicy(domain, policy_id, policy.text, now, now + policy.max_age)
            await asyncio.to_thread(self._store.store_policy, entry)
            log.info("MTA-STS policy of %s: mode %s, id %s", domain, policy.mode, policy_id)
            return policy, None
        finally:
            del self._fetching[domain]
            done.set_result(None)


def _parse_cached(cached: CachedPolicy) -> StsPolicy | None:
    try:
        return parse_policy(cached.text)
    except StsError:
        return None
