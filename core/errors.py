"""The exception hierarchy of mailgate.core: every error the core raises on purpose."""

from __future__ import annotations

from pathlib import Path


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


class CorruptSpoolFile(SpoolError):
    """A spool file exists but cannot be parsed (truncated, damaged, foreign)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


class NoSuchMessage(SpoolError):
    """No spool file has this queue id (delivered, deleted, or never stored)."""


class DeliveryError(MailgateError):
    """A message could not be delivered to a mailbox (temporary unless ``permanent``)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class RelayError(MailgateError):
    """Outbound delivery to one destination failed this time, or for good.

    ``status`` is the RFC 3463 code reported in a notification (4.x.x temporary, 5.x.x
    permanent); ``reply`` the remote server's reply, if the failure came from one.
    """

    def __init__(self, message: str, *, status: str, reply: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reply = reply

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")
