"""`mailgate dkim keygen|check`: make a DKIM key and its DNS record; check a published record.

    mailgate dkim keygen DOMAIN SELECTOR [--ed25519] [--bits 2048] [--dir DIR] [--force]
    mailgate dkim check DOMAIN SELECTOR [--key FILE] [--rules FILE] [--nameserver ADDR]

``keygen`` writes the private key to ``DIR/DOMAIN.SELECTOR.key`` (PEM, PKCS#8, mode 0600;
an existing file is kept unless ``--force``) and prints the TXT record to publish at
``SELECTOR._domainkey.DOMAIN``, split into quoted strings under 255 bytes, and the
``keys:`` entry for the dkim rule file.

``check`` looks the record up through mailgate's resolver (the dkim rule file's ``dns:``
settings, or ``--nameserver``) and checks it: a DKIM key record, not revoked, of a usable
type and size, and, given a key (``--key``, else the one the rule file's ``keys:`` names
for that domain and selector), the public half of that key. Exit status: 0 all good,
1 a problem with the record (missing, malformed, revoked, another key), 2 a usage error
(an unreadable key, a bad rule file), 75 (EX_TEMPFAIL) when DNS gave no answer.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailgate.policies.dkim import Settings, valid_domain, valid_selector

EX_TEMPFAIL = 75
# RFC 1035 character-strings hold 255 bytes; keep each string of the record under that.
STRING_SIZE = 250


class _UsageError(Exception):
    pass


def txt_strings(record: str, size: int = STRING_SIZE) -> list[str]:
    """The record cut into strings of at most ``size`` bytes (to quote one by one)."""
    return [record[start : start + size] for start in range(0, len(record), size)] or [""]


def dns_record(algorithm: str, public: str) -> str:
    """The TXT value for a public key (``p=``, base64)."""
    kind = "ed25519" if algorithm.startswith("ed25519") else "rsa"
    return f"v=DKIM1; k={kind}; h=sha256; p={public}"


def zone_line(domain: str, selector: str, record: str) -> str:
    """A BIND zone line for the record, its strings quoted (and parenthesised if several)."""
    strings = txt_strings(record)
    owner = f"{selector}._domainkey.{domain}."
    if len(strings) == 1:
        return f'{owner} IN TXT "{strings[0]}"'
    inner = "\n".join(f'    "{part}"' for part in strings)
    return f"{owner} IN TXT (\n{inner} )"


def _settings(args: argparse.Namespace) -> tuple[Settings, Path | None]:
    """The dkim rule file's settings (the shipped file unless --rules), and its path."""
    from mailgate.milters import registry
    from mailgate.milters.runner import DaemonError, default_rules
    from mailgate.policies.rules import RuleError, load_rules

    if args.rules is None:
        try:
            path = default_rules(registry.get("dkim"))
        except DaemonError:
            return Settings(), None
    else:
        path = args.rules
    try:
        ruleset = load_rules(path, check_test_files=False)
    except RuleError as exc:
        raise _UsageError("\n".join(exc.problems) if exc.problems else f"{path}: {exc}") from None
    except OSError as exc:
        raise _UsageError(f"{path}: cannot read the rules: {exc.strerror or exc}") from None
    if ruleset.daemon != "dkim":
        raise _UsageError(f"{path}: a rule file for {ruleset.daemon}, not dkim")
    settings = ruleset.settings if isinstance(ruleset.settings, Settings) else Settings()
    return settings, Path(path)


def _names(args: argparse.Namespace) -> tuple[str, str]:
    domain = args.domain.strip().rstrip(".").lower()
    selector = args.selector.strip().lower()
    if not valid_domain(domain):
        raise _UsageError(f"{args.domain!r} is not a domain name")
    if not valid_selector(selector):
        raise _UsageError(f"{args.selector!r} is not a selector (DNS labels)")
    return domain, selector


# -- keygen ---------------------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    from mailgate.milters.dkim import parse_private_key

    try:
        domain, selector = _names(args)
        if not args.ed25519 and not 1024 <= args.bits <= 8192:
            raise _UsageError("--bits: from 1024 to 8192 (2048 is the usual size)")
    except _UsageError as exc:
        print(f"mailgate dkim keygen: {exc}", file=sys.stderr)
        return 2
    directory = Path(args.dir)
    path = directory / f"{domain}.{selector}.key"
    if path.exists() and not args.force:
        print(
            f"mailgate dkim keygen: {path} exists; keeping it (--force replaces it)",
            file=sys.stderr,
        )
        return 1
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if args.ed25519:
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=args.bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name with mode 0600 from the start, then renamed: the
        # key is never readable by others, not even for a moment.
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        print(f"mailgate dkim keygen: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    loaded = parse_private_key(pem, str(path))
    record = dns_record(loaded.algorithm, loaded.public)
    kind = "Ed25519" if args.ed25519 else f"{loaded.bits}-bit RSA"
    print(f"; {kind} key written to {path} (mode 0600)")
    print(f"; publish this TXT record at {selector}._domainkey.{domain}:")
    print(zone_line(domain, selector, record))
    print("; and list the key in the dkim rule file's settings:")
    print(f";   keys:\n;     {domain}:\n;       - {{selector: {selector}, key: {path.resolve()}}}")
    return 0


# -- check ----------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    from dkim.util import parse_tag_value  # type: ignore[import-untyped]

    from mailgate.core.dns import DnsTempError, Resolver, resolver_for
    from mailgate.milters.dkim import KeyFileError, LoadedKey, load_key
    from mailgate.policies.settings import DnsSettings

    try:
        domain, selector = _names(args)
        settings, rules = _settings(args)
        key_path: Path | None = args.key
        if key_path is None:
            for key in settings.keys.get(domain, ()):
                if key.selector == selector:
                    key_path = key.key
        loaded: LoadedKey | None = None
        if key_path is not None:
            try:
                loaded = load_key(Path(key_path))
            except KeyFileError as exc:
                raise _UsageError(str(exc)) from None
        dns_settings = settings.dns
        if args.nameserver:
            dns_settings = DnsSettings.model_validate(
                {**dns_settings.model_dump(), "nameservers": args.nameserver}
            )
    except (_UsageError, ValueError) as exc:
        print(f"mailgate dkim check: {exc}", file=sys.stderr)
        return 2
    name = f"{selector}._domainkey.{domain}"
    resolver: Resolver = resolver_for(dns_settings)
    try:
        answer = resolver.query(name, "TXT")
    except DnsTempError as exc:
        print(f"{name}: DNS gave no answer ({exc.why}); try again later")
        return EX_TEMPFAIL
    if answer.status != "ok" or not answer.txt:
        why = "does not exist" if answer.status == "nxdomain" else "has no TXT record"
        print(f"{name}: FAIL: {why}; publish the record printed by mailgate dkim keygen")
        return 1
    records = [record for record in answer.txt if b"p=" in record] or list(answer.txt)
    if len(records) > 1:
        print(f"{name}: FAIL: {len(records)} key records; publish exactly one")
        return 1
    record = records[0]
    print(f"{name}: found: {record.decode('utf-8', 'replace')}")
    try:
        tags = dict(parse_tag_value(record))
    except Exception:
        print(f"{name}: FAIL: not a DKIM tag list (tag=value; ...)")
        return 1
    version = tags.get(b"v")
    if version is not None and version != b"DKIM1":
        print(f"{name}: FAIL: v={version.decode('ascii', 'replace')}, expected v=DKIM1")
        return 1
    if b"p" not in tags:
        print(f"{name}: FAIL: no p= (public key) in the record")
        return 1
    public = b"".join(tags[b"p"].split())
    if not public:
        print(f"{name}: FAIL: the key is revoked (empty p=)")
        return 1
    kind = tags.get(b"k", b"rsa").strip().lower()
    service = tags.get(b"s", b"*").strip().lower()
    if service not in (b"*", b"email") and b"email" not in service.split(b":"):
        print(f"{name}: FAIL: s={service.decode()}: the key is not for email")
        return 1
    hashes = tags.get(b"h")
    if hashes is not None and b"sha256" not in [h.strip() for h in hashes.lower().split(b":")]:
        print(f"{name}: FAIL: h={hashes.decode()}: sha256 is not allowed")
        return 1
    try:
        raw = base64.b64decode(public, validate=True)
    except ValueError:
        print(f"{name}: FAIL: p= is not valid base64")
        return 1
    if kind == b"ed25519":
        if len(raw) != 32:
            print(f"{name}: FAIL: an Ed25519 key is 32 bytes, p= has {len(raw)}")
            return 1
        description = "Ed25519 key"
    elif kind == b"rsa":
        try:
            loaded_public = serialization.load_der_public_key(raw)
        except ValueError:
            print(f"{name}: FAIL: p= is not an RSA public key")
            return 1
        if not isinstance(loaded_public, rsa.RSAPublicKey):
            print(f"{name}: FAIL: k=rsa but p= is another kind of key")
            return 1
        bits = loaded_public.key_size
        description = f"{bits}-bit RSA key"
        if bits < 1024:
            print(f"{name}: FAIL: {description}: verifiers refuse keys under 1024 bits (RFC 8301)")
            return 1
    else:
        print(f"{name}: FAIL: k={kind.decode('ascii', 'replace')}: not rsa or ed25519")
        return 1
    print(f"{name}: OK: a valid {description}")
    if b"t" in tags and b"y" in [t.strip() for t in tags[b"t"].split(b":")]:
        print(f"{name}: note: t=y (testing): verifiers may treat signatures as unsigned")
    if loaded is None:
        print(f"{name}: no private key given (--key, or keys: in the rule file): record only")
        return 0
    source = f"{key_path}" + (f" (from {rules})" if args.key is None and rules else "")
    if loaded.public.encode() != public:
        print(f"{name}: FAIL: the record does not hold the public half of {source}")
        return 1
    print(f"{name}: OK: matches the private key {source}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "dkim",
        help="DKIM: make a signing key and its DNS record (keygen), check a record (check)",
        description="Work with the DKIM daemon's keys and their DNS records.",
    )
    commands = parser.add_subparsers(dest="dkim_command", metavar="COMMAND")
    commands.required = True
    keygen = commands.add_parser(
        "keygen",
        help="write a new private key and print its DNS TXT record",
        description=(
            "Write a new DKIM private key to DIR/DOMAIN.SELECTOR.key (PEM, mode 0600) and "
            "print the TXT record to publish at SELECTOR._domainkey.DOMAIN."
        ),
    )
    keygen.add_argument("domain", metavar="DOMAIN", help="the signing domain (d=)")
    keygen.add_argument("selector", metavar="SELECTOR", help="the selector (s=), e.g. s2026")
    keygen.add_argument(
        "--ed25519", action="store_true", help="an Ed25519 key (RFC 8463) instead of RSA"
    )
    keygen.add_argument(
        "--bits", type=int, default=2048, metavar="N", help="RSA key size (default 2048)"
    )
    keygen.add_argument(
        "--dir", default=".", metavar="DIR", help="where to write the key (default: here)"
    )
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    keygen.set_defaults(handler=_keygen)
    check = commands.add_parser(
        "check",
        help="check the published TXT record (and that it matches the key)",
        description=(
            "Look up SELECTOR._domainkey.DOMAIN and check it is a usable DKIM key record "
            "holding the public half of the key. Exit status: 0 good, 1 a problem with the "
            "record, 2 usage error, 75 DNS gave no answer."
        ),
    )
    check.add_argument("domain", metavar="DOMAIN", help="the signing domain (d=)")
    check.add_argument("selector", metavar="SELECTOR", help="the selector (s=)")
    check.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        help="the private key (default: the one the rule file lists for DOMAIN and SELECTOR)",
    )
    check.add_argument(
        "--rules",
        "-r",
        type=Path,
        metavar="FILE",
        help="the dkim rule file whose keys and dns settings to use (default: the shipped one)",
    )
    check.add_argument(
        "--nameserver",
        action="append",
        metavar="ADDRESS",
        help="ask this nameserver (ADDRESS[:PORT]; repeatable) instead of the settings'",
    )
    check.set_defaults(handler=_check)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `dkim` on its own, as `mailgate dkim` would."""
    parser = argparse.ArgumentParser(prog="mailgate")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    args = parser.parse_args(argv)
    try:
        status: int = args.handler(args)
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
