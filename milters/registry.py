"""The policy daemons `mailgate milter NAME` can run: a name, a one-line description, a class.

A daemon is a :class:`mailgate.milters.adapter.PolicyMilter` subclass in its own module of
this package. To add one, write the module and add one ``register(...)`` line at the bottom of
this file. The class is named by ``"module:Class"`` and imported only when the daemon runs,
so ``mailgate milter --list`` stays cheap and a broken daemon module names itself instead
of breaking every other daemon.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailgate.milters.adapter import PolicyMilter

# The same names the configuration accepts for a milter (core/config.py, MilterConfig.name).
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class UnknownDaemon(LookupError):
    """No daemon of that name is registered."""

    def __init__(self, name: str, known: list[str]) -> None:
        choices = ", ".join(known) or "(none)"
        super().__init__(f"unknown daemon {name!r}; known daemons: {choices}")
        self.name = name


@dataclass(frozen=True, slots=True)
class DaemonEntry:
    """One registered daemon. ``target`` is ``"package.module:ClassName"``."""

    name: str
    description: str
    target: str

    @property
    def rules_file(self) -> str:
        """The default rule file's name in the shipped rules directory."""
        return f"{self.name}.yaml"

    def load(self) -> type[PolicyMilter]:
        """Import the daemon's class (this is where an import error in its module surfaces)."""
        from mailgate.milters.adapter import PolicyMilter

        module_name, _, attr = self.target.partition(":")
        module = importlib.import_module(module_name)
        cls = getattr(module, attr, None)
        if not (isinstance(cls, type) and issubclass(cls, PolicyMilter)):
            raise TypeError(f"{self.target}: not a PolicyMilter subclass")
        return cls


_DAEMONS: dict[str, DaemonEntry] = {}


def register(name: str, description: str, target: str) -> DaemonEntry:
    """Make a daemon runnable as ``mailgate milter NAME``; return its entry."""
    if not _NAME_RE.match(name):
        raise ValueError(f"daemon name {name!r}: use lower-case letters, digits, '-' and '_'")
    if not description or "\n" in description:
        raise ValueError(f"daemon {name!r}: the description must be one non-empty line")
    if ":" not in target:
        raise ValueError(f"daemon {name!r}: target must be 'module:Class', got {target!r}")
    if name in _DAEMONS:
        raise ValueError(f"daemon {name!r} is registered twice")
    entry = DaemonEntry(name, description, target)
    _DAEMONS[name] = entry
    return entry


def get(name: str) -> DaemonEntry:
    try:
        return _DAEMONS[name]
    except KeyError:
        raise UnknownDaemon(name, sorted(_DAEMONS)) from None


def daemons() -> list[DaemonEntry]:
    """Every registered daemon, by name."""
    return [_DAEMONS[name] for name in sorted(_DAEMONS)]


register(
    "content",
    "header, envelope and body rules (Sieve-style tests) from a YAML rule file",
    "mailgate.milters.content:ContentMilter",
)
register(
    "arc",
    "ARC (RFC 8617): validates the chain of inbound mail, seals mail forwarded or modified",
    "mailgate.milters.arc:ArcMilter",
)
register(
    "dmarc",
    "DMARC (RFC 7489): SPF/DKIM alignment, p/sp/np/pct, one Authentication-Results, reports",
    "mailgate.milters.dmarc:DmarcMilter",
)
register(
    "dkim",
    "DKIM (RFC 6376, RFC 8463): verifies every signature, signs outgoing mail per domain",
    "mailgate.milters.dkim:DkimMilter",
)
register(
    "spf",
    "SPF (RFC 7208) checks of HELO and MAIL FROM, Received-SPF and Authentication-Results",
    "mailgate.milters.spf:SpfMilter",
)
register(
    "quota",
    "mailbox storage quotas and attachment limits from the user store (452/552 at RCPT/DATA)",
    "mailgate.milters.quota:QuotaMilter",
)
register(
    "dnsbl",
    "DNS block and allow lists (DNSBL/DNSWL) with weights and return codes, at connect or RCPT",
    "mailgate.milters.dnsbl:DnsblMilter",
)
register(
    "greylist",
    "greylisting of unknown (client network, sender, recipient) triplets at RCPT TO",
    "mailgate.milters.greylist:GreylistMilter",
)
register(
    "ratelimit",
    "sliding-window limits on connections, messages and recipients per client, user, domain",
    "mailgate.milters.ratelimit:RateLimitMilter",
)
register(
    "spamassassin",
    "SpamAssassin's score from spamd (SPAMD protocol): tag, quarantine or reject by rules",
    "mailgate.milters.spamassassin:SpamAssassinMilter",
)
register(
    "clamav",
    "virus scanning with clamd (INSTREAM over TCP or a Unix socket)",
    "mailgate.milters.clamav:ClamavMilter",
)
