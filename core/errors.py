"""The exception hierarchy of mailgate.core: every error the core raises on purpose."""

from __future__ import annotations


class MailgateError(Exception):
    """Base of every error raised deliberately by mailgate.core."""


class ConfigError(MailgateError):
    """A configuration file, variable or flag is invalid.

    ``problems`` holds one human-readable line per problem, each naming the file, the line
    and the field where that is known (``mailgate.yaml:12: smtp_listen[0]: ...``).
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class UserStoreError(MailgateError):
    """A user-store operation failed (unknown user, duplicate address, bad domain ...)."""


class SpoolError(MailgateError):
    """A message could not be written to, read from or removed from the spool."""


class DeliveryError(MailgateError):
    """A message could not be delivered to a mailbox (temporary unless ``permanent``)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
