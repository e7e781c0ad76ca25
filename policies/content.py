"""Content facts: what a message's MIME structure holds, for rules and the content daemon.

Owns the MIME walk (stdlib ``email``, default policy): the decoded text of the text parts
(HTML reduced to its visible text), the attachments with their file names (RFC 2231 and
RFC 2047 decoded), declared and sniffed types (magic bytes), sizes and, for zip archives,
member names and encryption. Mail is hostile input, so nothing here raises: every problem
with the MIME structure is recorded in ``mime_errors`` and the walk goes on.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from email.message import EmailMessage, Message
from html.parser import HTMLParser
from typing import Any

from mailgate.policies.facts import MessageFacts

# Bounds that keep one hostile message from costing unbounded time or memory in matching.
MAX_TEXT_CHARS = 1_000_000  # per text part
MAX_MEMBERS = 1000  # archive member names kept per attachment
MAX_PARTS = 1000  # MIME parts looked at per message
_SNIFF_BYTES = 64 * 1024

OOXML_TYPES = {
    "word/": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "xl/": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "ppt/": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
}

# (offset, magic, type). Names follow `file --mime-type` where it has one, so operators can
# check a sample with the tool they know.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"MZ", "application/x-dosexec"),
    (0, b"\x7fELF", "application/x-executable"),
    (0, b"\xcf\xfa\xed\xfe", "application/x-mach-binary"),
    (0, b"\xce\xfa\xed\xfe", "application/x-mach-binary"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"PK\x05\x06", "application/zip"),
    (0, b"PK\x07\x08", "application/zip"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
    (0, b"Rar!\x1a\x07", "application/x-rar"),
    (0, b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (0, b"\x1f\x8b", "application/gzip"),
    (0, b"BZh", "application/x-bzip2"),
    (0, b"\xfd7zXZ\x00", "application/x-xz"),
    (0, b"MSCF", "application/vnd.ms-cab-compressed"),
    (0, b"L\x00\x00\x00\x01\x14\x02\x00", "application/x-ms-shortcut"),
    (0, b"{\\rtf", "text/rtf"),
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0x8001, b"CD001", "application/x-iso9660-image"),
)

# Text that is really a program: checked on the lowercased start of text-like data.
_SCRIPT_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^#!"), "text/x-shellscript"),
    (re.compile(r"<hta:application"), "application/hta"),
    (re.compile(r"^\s*@?echo\s+off"), "text/x-msdos-batch"),
    (
        re.compile(r"(-encodedcommand|invoke-expression|\biex\s*\(|new-object\s+net\.)"),
        "text/x-powershell",
    ),
    # JScript first: it uses WScript too, but only it says ActiveXObject.
    (re.compile(r"activexobject"), "application/javascript"),
    (re.compile(r"(wscript\.|createobject\s*\(|\bexecute\s*\()"), "text/x-vbscript"),
    (re.compile(r"^\s*(<!doctype\s+html|<html|<script)"), "text/html"),
)


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment (or inline non-text part) of a message."""

    filename: str  # "" when the part has none
    content_type: str  # declared, lowercased ("application/octet-stream" by default)
    sniffed_type: str  # from the content; see sniff()
    size: int  # decoded bytes
    disposition: str = ""  # "attachment", "inline" or ""
    encrypted: bool = False  # a zip with encrypted members
    members: tuple[str, ...] = ()  # file names inside a zip archive


@dataclass(frozen=True, slots=True)
class ContentFacts:
    """What the content of one message shows."""

    texts: tuple[str, ...] = ()  # decoded text of each body text part, HTML as visible text
    attachments: tuple[Attachment, ...] = ()
    mime_errors: tuple[str, ...] = ()
    size: int = 0

    @property
    def mime_error(self) -> str | None:
        """All MIME problems in one line, or None for a clean message."""
        return "; ".join(self.mime_errors) if self.mime_errors else None

    def as_extra(self) -> dict[str, Any]:
        """The facts for MessageFacts.extra, as the content daemon publishes them."""
        return {
            "mime_error": self.mime_error,
            "attachment_count": len(self.attachments),
            "attachment_names": [a.filename for a in self.attachments if a.filename],
        }


def content_facts(facts: MessageFacts) -> ContentFacts:
    """Analyse the message of ``facts`` (never raises)."""
    try:
        message = facts.message
    except Exception as exc:  # the parser itself gave up: nothing to walk
        return ContentFacts(mime_errors=(f"unparsable message: {_error_text(exc)}",))
    return analyze(message, size=facts.size)


def analyze(message: Message | bytes, *, size: int | None = None) -> ContentFacts:
    """Walk a parsed message (or raw bytes) and collect its content facts (never raises)."""
    if isinstance(message, bytes):
        raw_size = len(message)
        try:
            message = MessageFacts.from_bytes(message).message
        except Exception as exc:
            return ContentFacts(mime_errors=(f"unparsable message: {_error_text(exc)}",))
        size = raw_size if size is None else size
    walker = _Walker()
    walker.walk(message)
    return ContentFacts(
        texts=tuple(walker.texts),
        attachments=tuple(walker.attachments),
        mime_errors=tuple(dict.fromkeys(walker.errors)),
        size=size or 0,
    )


class _Walker:
    def __init__(self) -> None:
        self.texts: list[str] = []
        self.attachments: list[Attachment] = []
        self.errors: list[str] = []

    def walk(self, message: Message) -> None:
        try:
            for count, part in enumerate(message.walk()):
                if count >= MAX_PARTS:
                    self.errors.append(f"more than {MAX_PARTS} MIME parts; the rest not read")
                    break
                try:
                    self._part(part)
                except Exception as exc:
                    self.errors.append(f"unreadable MIME part: {_error_text(exc)}")
                # After reading the part: decoding its payload is what finds some defects.
                self._defects(part)
        except Exception as exc:
            self.errors.append(f"MIME structure: {_error_text(exc)}")

    def _defects(self, part: Message) -> None:
        for defect in getattr(part, "defects", ()):
            self.errors.append(describe_defect(defect))

    def _part(self, part: Message) -> None:
        content_type = part.get_content_type()
        if part.is_multipart() and content_type != "message/rfc822":
            return
        filename = self._filename(part)
        disposition = (part.get_content_disposition() or "").lower()
        maintype = part.get_content_maintype()
        is_body_text = content_type in ("text/plain", "text/html") and not filename
        if is_body_text and disposition != "attachment":
            text = self._text(part)
            if content_type == "text/html":
                text = html_to_text(text)
            self.texts.append(text.replace("\r\n", "\n")[:MAX_TEXT_CHARS])
            return
        if maintype == "multipart":
            return
        if content_type == "message/rfc822":
            # The walk descends into the attached message; record the container too, so
            # "forwarded as attachment" counts as an attachment.
            self.attachments.append(
                Attachment(filename, content_type, "message/rfc822", 0, disposition)
            )
            return
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        sniffed = sniff(data)
        members: tuple[str, ...] = ()
        encrypted = False
        if sniffed == "application/zip":
            members, encrypted = zip_members(data)
            sniffed = refine_zip(sniffed, members)
        self.attachments.append(
            Attachment(filename, content_type, sniffed, len(data), disposition, encrypted, members)
        )

    def _filename(self, part: Message) -> str:
        try:
            name = part.get_filename()
        except Exception as exc:
            self.errors.append(f"bad file name parameter: {_error_text(exc)}")
            return ""
        return str(name).strip() if name else ""

    def _text(self, part: Message) -> str:
        if isinstance(part, EmailMessage):
            try:
                content = part.get_content()
                if isinstance(content, str):
                    return content
            except LookupError:
                self.errors.append(f"unknown charset {part.get_content_charset()!r}")
            except Exception as exc:
                self.errors.append(f"undecodable text part: {_error_text(exc)}")
        payload = part.get_payload(decode=True)
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


def describe_defect(defect: Exception) -> str:
    """A MIME defect as words: CloseBoundaryNotFoundDefect -> "close boundary not found"."""
    name = type(defect).__name__.removesuffix("Defect")
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).lower()
    detail = str(defect)
    return f"{words}: {detail}" if detail and detail != name else words


def sniff(data: bytes) -> str:
    """The type of ``data`` by its magic bytes; text is checked for script hints.

    Unknown binary data is "application/octet-stream"; unknown text is "text/plain".
    """
    if not data:
        return "application/x-empty"
    for offset, magic, kind in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return kind
    head = data[:_SNIFF_BYTES]
    if b"%PDF-" in head[:1024]:  # the PDF header may follow junk (and often does in malware)
        return "application/pdf"
    if not _looks_like_text(head):
        return "application/octet-stream"
    text = head.decode("utf-8", "replace").lower()
    for pattern, kind in _SCRIPT_HINTS:
        if pattern.search(text):
            return kind
    return "text/plain"


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    controls = sum(1 for byte in head if byte < 32 and byte not in (9, 10, 12, 13, 27))
    return controls * 20 < len(head)


def zip_members(data: bytes) -> tuple[tuple[str, ...], bool]:
    """The member names of a zip archive and whether any member is encrypted."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except Exception:
        return (), False
    names = tuple(info.filename for info in infos[:MAX_MEMBERS])
    encrypted = any(info.flag_bits & 0x1 for info in infos)
    return names, encrypted


def refine_zip(sniffed: str, members: tuple[str, ...]) -> str:
    """Tell Office Open XML documents and Java archives from plain zip files."""
    if "[Content_Types].xml" in members:
        for prefix, kind in OOXML_TYPES.items():
            if any(name.startswith(prefix) for name in members):
                return kind
    if "META-INF/MANIFEST.MF" in members:
        return "application/java-archive"
    return sniffed


class _TextExtractor(HTMLParser):
    _SKIP = frozenset({"script", "style", "head", "title", "template"})
    _BREAK = frozenset(
        {"br", "p", "div", "tr", "td", "th", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self.skipping += 1
        elif tag in self._BREAK:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self._BREAK:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.chunks.append(data)


def html_to_text(html: str) -> str:
    """The visible text of an HTML document, so body tests see words, not markup."""
    parser = _TextExtractor()
    try:
        parser.feed(html)
        parser.close()
    except Exception:
        # HTMLParser is lenient; if it still fails, matching the raw markup beats nothing.
        return html
    text = "".join(parser.chunks)
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
