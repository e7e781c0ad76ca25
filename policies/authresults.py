"""Authentication-Results (RFC 8601) fields other servers, or forgers, put in a message.

The daemons that write our Authentication-Results (spf, dkim, arc, dmarc) first remove
every field that claims our authserv-id: only we may speak in our name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from mailgate.policies.verdict import HeaderChange

_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


def authserv_id_of(value: str) -> str:
    """The authserv-id an Authentication-Results value names ("" if it names none)."""
    text = value
    for _ in range(4):  # comments may nest a little; a forged header is no reason to loop
        stripped = _COMMENT.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    head = text.split(";", 1)[0].strip()
    if not head:
        return ""
    first = head.split()[0]
    if first.startswith('"') and first.endswith('"') and len(first) > 1:
        first = first[1:-1]
    return first


def forged_removals(headers: Iterable[tuple[str, str]], authserv_id: str) -> list[HeaderChange]:
    """Deletions of the Authentication-Results fields that claim ``authserv_id``.

    RFC 8601 section 5: a receiver MUST remove such fields it did not add itself, or
    recipients would trust a forger's results. The index counts only fields of that
    name (1-based); the highest index comes first, so each deletion leaves the indexes
    of those still to be deleted unchanged whatever the MTA does with deleted fields.
    """
    wanted = authserv_id.lower()
    indexes: list[int] = []
    index = 0
    for name, value in headers:
        if name.lower() != "authentication-results":
            continue
        index += 1
        if authserv_id_of(value).lower() == wanted:
            indexes.append(index)
    return [
        HeaderChange(op="change", name="Authentication-Results", value="", index=i)
        for i in sorted(indexes, reverse=True)
    ]
