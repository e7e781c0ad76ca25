"""The content-rules daemon (``mailgate milter content``).

Envelope, header, body and attachment tests from a YAML rule file (by default the shipped
``rules/content.yaml``), decided at end of message by the shared adapter. The MIME walk
(``mailgate.policies.content``) is run by the rule engine itself, and only when a rule
asks about the body or the attachments, so a rule set of envelope tests costs no parsing.
"""

from __future__ import annotations

from typing import ClassVar

from mailgate.milters.adapter import PolicyMilter

# Above the core's default max_message_size (25M): the attachment and MIME-structure tests
# must see whole messages, since a cut multipart looks malformed and hides its last parts.
CONTENT_BODY_LIMIT = 32 * 1024 * 1024


class ContentMilter(PolicyMilter):
    """One MTA connection of the content daemon."""

    body_limit: ClassVar[int] = CONTENT_BODY_LIMIT
