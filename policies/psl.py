"""The Public Suffix List, offline: a domain's organizational domain (RFC 7489 section 3.2).

DMARC's relaxed alignment and its policy discovery need the "organizational domain" of a
name: the registered domain, one label below a public suffix (``mail.example.co.uk`` →
``example.co.uk``). The list comes with the ``publicsuffixlist`` package, so no lookup ever
fetches it; an operator may point ``public_suffix_list`` at a newer copy of
``public_suffix_list.dat`` (the format published at publicsuffix.org), read once per
process. Names under a top-level domain the list does not know are treated by the list's
default rule ``*``: their last label is the suffix (``x.example.test`` → ``example.test``).
"""

from __future__ import annotations

import contextlib
import threading
from functools import lru_cache
from pathlib import Path

from publicsuffixlist import PublicSuffixList

_lock = threading.Lock()
_lists: dict[str, PublicSuffixList] = {}


def suffix_list(path: str = "") -> PublicSuffixList:
    """The list in force: the file at ``path``, or the copy shipped with the package."""
    with _lock:
        found = _lists.get(path)
        if found is None:
            if path:
                with Path(path).open("rb") as source:
                    found = PublicSuffixList(source)
            else:
                found = PublicSuffixList()
            _lists[path] = found
        return found


def normal(domain: str) -> str:
    """A domain as compared: lower case, no final dot, A-labels for internationalized names."""
    domain = domain.strip().rstrip(".").lower()
    if not domain.isascii():
        with contextlib.suppress(UnicodeError):
            domain = domain.encode("idna").decode("ascii")
    return domain


@lru_cache(maxsize=4096)
def _organizational(domain: str, path: str) -> str:
    private = suffix_list(path).privatesuffix(domain)
    # A public suffix itself (or a single label) has no registered domain below a suffix:
    # it is its own organizational domain.
    return str(private) if private else domain


def organizational_domain(domain: str, path: str = "") -> str:
    """The organizational domain of ``domain`` (RFC 7489 3.2), from the list at ``path``."""
    domain = normal(domain)
    if not domain:
        return ""
    return _organizational(domain, path)


def is_public_suffix(domain: str, path: str = "") -> bool:
    """True if ``domain`` is itself a public suffix (``co.uk``, ``com``)."""
    domain = normal(domain)
    return bool(domain) and bool(suffix_list(path).is_public(domain))
