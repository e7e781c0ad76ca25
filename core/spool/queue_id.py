"""Queue identifiers: short, unique across processes and restarts, roughly time-ordered.

An identifier is 16 characters of Crockford's base 32 alphabet (digits and upper-case
letters): 11 for the microseconds since the epoch, 5 (25 bits) of randomness. The time
part never repeats within one process, so two processes collide only if they draw the
same random suffix in the same microsecond. The alphabet sorts in ASCII order, so sorting
identifiers sorts them by arrival, and every identifier is a safe file name.
"""

from __future__ import annotations

import re
import secrets
import threading
import time

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TIME_DIGITS = 11  # 32**11 microseconds reach past the year 3000
RANDOM_DIGITS = 5
QUEUE_ID_LENGTH = TIME_DIGITS + RANDOM_DIGITS

# What the spool accepts as a file name. Wider than what new_queue_id makes, so that ids
# from tests or a later format still work, but never a path separator or a dot.
QUEUE_ID_RE = re.compile(r"^[0-9A-Za-z]{1,64}$")

_lock = threading.Lock()
_last_us = 0


def _base32(value: int, digits: int) -> str:
    out = []
    for _ in range(digits):
        value, rem = divmod(value, 32)
        out.append(ALPHABET[rem])
    return "".join(reversed(out))


def new_queue_id() -> str:
    """A fresh queue id such as ``0PQ3V7K2M1ZX4B8C``."""
    global _last_us
    with _lock:
        # A clock step backwards (NTP) or two calls in one microsecond must not reuse a value.
        now = max(time.time_ns() // 1000, _last_us + 1)
        _last_us = now
    return _base32(now, TIME_DIGITS) + _base32(secrets.randbits(5 * RANDOM_DIGITS), RANDOM_DIGITS)


def is_valid_queue_id(text: str) -> bool:
    return QUEUE_ID_RE.match(text) is not None
