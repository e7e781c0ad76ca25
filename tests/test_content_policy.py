"""Content facts: text extraction, attachments, file names, sniffing, archives, broken MIME."""

from __future__ import annotations

import io
import zipfile
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.policies.content import (
    MAX_PARTS,
    analyze,
    content_facts,
    html_to_text,
    sniff,
    zip_members,
)
from mailgate.policies.facts import MessageFacts

PE = b"MZ\x90\x00\x03\x00\x00\x00" + b"\x00" * 56 + b"PE\x00\x00"


def base(text: str = "Hello.\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.com>"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "test"
    msg.set_content(text)
    return msg


def zipped(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_text_parts_are_decoded() -> None:
    msg = base()
    msg.set_content("Grüße, naïve café\n", charset="iso-8859-1", cte="quoted-printable")
    msg.add_alternative(
        "<html><head><title>T</title><style>p {color: red}</style></head>"
        "<body><p>Hello&amp;welcome</p><div>to <b>the</b><br>shop</div>"
        "<script>document.write('hidden')</script></body></html>",
        subtype="html",
        cte="base64",
    )
    facts = content_facts(MessageFacts.from_bytes(msg.as_bytes()))
    assert facts.texts == ("Grüße, naïve café\n", "Hello&welcome\nto the\nshop")
    assert facts.attachments == ()
    assert facts.mime_errors == ()
    assert facts.mime_error is None


def test_html_to_text() -> None:
    assert html_to_text("<p>a</p><p>b&nbsp;&lt;c&gt;</p>") == "a\nb <c>"
    assert html_to_text("<STYLE>x</STYLE>visible<!-- hidden -->") == "visible"
    assert html_to_text("unclosed <b attr='").startswith("unclosed")


def test_attachments_with_names_types_and_sizes() -> None:
    msg = base()
    msg.add_attachment(PE, maintype="application", subtype="x-msdownload", filename="setup.exe")
    msg.add_attachment(b"%PDF-1.7\n...", maintype="application", subtype="pdf", filename="a.pdf")
    msg.add_attachment(
        b"\x89PNG\r\n\x1a\n....", maintype="image", subtype="png", disposition="inline"
    )
    msg.add_attachment("col1,col2\n1,2\n", subtype="csv", filename="data.csv")
    attachments = content_facts(MessageFacts.from_bytes(msg.as_bytes())).attachments
    summary = [
        (a.filename, a.content_type, a.sniffed_type, a.size, a.disposition) for a in attachments
    ]
    assert summary == [
        ("setup.exe", "application/x-msdownload", "application/x-dosexec", len(PE), "attachment"),
        ("a.pdf", "application/pdf", "application/pdf", 12, "attachment"),
        ("", "image/png", "image/png", 12, "inline"),
        # Text travels with CRLF line ends, and that is what the recipient gets.
        ("data.csv", "text/csv", "text/plain", 16, "attachment"),
    ]


def test_file_names_rfc2231_and_encoded_words() -> None:
    msg = base()
    msg.add_attachment(
        PE, maintype="application", subtype="octet-stream", filename="Rechnung März.exe"
    )
    raw = msg.as_bytes()
    assert b"filename*=" in raw  # the email package wrote RFC 2231
    continued = (
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\n"
        b"Content-Type: application/octet-stream\n"
        b"Content-Disposition: attachment; filename*0*=utf-8''%E2%82%AC; filename*1=rates.exe\n\n"
        b"MZ\n--b\n"
        b'Content-Type: application/octet-stream; name="=?utf-8?q?r=C3=A9sum=C3=A9.scr?="\n\n'
        b"MZ\n--b--\n"
    )
    names = [a.filename for a in content_facts(MessageFacts.from_bytes(raw)).attachments]
    names += [a.filename for a in analyze(continued).attachments]
    assert names == ["Rechnung März.exe", "€rates.exe", "résumé.scr"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (PE, "application/x-dosexec"),
        (b"\x7fELF\x02\x01\x01", "application/x-executable"),
        (b"\xcf\xfa\xed\xfe\x07", "application/x-mach-binary"),
        (b"%PDF-1.5\n", "application/pdf"),
        (b"junk before the header %PDF-1.5\n", "application/pdf"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00\x00", "application/x-ole-storage"),
        (b"Rar!\x1a\x07\x01\x00", "application/x-rar"),
        (b"7z\xbc\xaf\x27\x1c\x00\x04", "application/x-7z-compressed"),
        (b"\x1f\x8b\x08\x00", "application/gzip"),
        (b"MSCF\x00\x00", "application/vnd.ms-cab-compressed"),
        (b"L\x00\x00\x00\x01\x14\x02\x00\x00", "application/x-ms-shortcut"),
        (b"{\\rtf1\\ansi", "text/rtf"),
        (b"\x89PNG\r\n\x1a\n\x00", "image/png"),
        (b"\xff\xd8\xff\xe0", "image/jpeg"),
        (b"GIF89a\x01\x00", "image/gif"),
        (b"\x00" * 0x8001 + b"CD001", "application/x-iso9660-image"),
        (b"#!/bin/sh\nrm -rf /\n", "text/x-shellscript"),
        (b"@echo off\r\ndel *.*\r\n", "text/x-msdos-batch"),
        (b"powershell -EncodedCommand SQBFAFgA", "text/x-powershell"),
        (b'Set s = CreateObject("WScript.Shell")', "text/x-vbscript"),
        (b"var x = new ActiveXObject('WScript.Shell');", "application/javascript"),
        (b"<html><hta:application id=x>", "application/hta"),
        (b"<!DOCTYPE html><html>", "text/html"),
        (b"Dear Bob,\nthe minutes.\n", "text/plain"),
        (bytes(range(256)), "application/octet-stream"),
        (b"", "application/x-empty"),
    ],
)
def test_sniff(data: bytes, expected: str) -> None:
    assert sniff(data) == expected


def test_zip_members_encryption_and_office_documents() -> None:
    plain = zipped({"a.txt": b"x", "dir/run.exe": PE})
    assert zip_members(plain) == (("a.txt", "dir/run.exe"), False)
    encrypted = bytearray(zipped({"secret.pdf": b"%PDF"}))
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        encrypted[encrypted.find(signature) + offset] |= 1  # the "encrypted" flag bit
    assert zip_members(bytes(encrypted)) == (("secret.pdf",), True)
    assert zip_members(b"PK\x03\x04 truncated") == ((), False)

    msg = base()
    docx = zipped({"[Content_Types].xml": b"<x/>", "word/document.xml": b"<x/>"})
    jar = zipped({"META-INF/MANIFEST.MF": b"Main-Class: x\n", "x.class": b"\xca\xfe"})
    for data, name in (
        (plain, "a.zip"),
        (bytes(encrypted), "b.zip"),
        (docx, "c.docx"),
        (jar, "d.jar"),
    ):
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    found = analyze(msg.as_bytes()).attachments
    assert [(a.sniffed_type, a.encrypted) for a in found] == [
        ("application/zip", False),
        ("application/zip", True),
        ("application/vnd.openxmlformats-officedocument.wordprocessingml.document", False),
        ("application/java-archive", False),
    ]
    assert found[0].members == ("a.txt", "dir/run.exe")


def test_attached_messages_are_walked() -> None:
    inner = base("inner text\n")
    inner.add_attachment(PE, maintype="application", subtype="octet-stream", filename="deep.exe")
    outer = base("outer text\n")
    outer.add_attachment(inner)
    facts = content_facts(MessageFacts.from_bytes(outer.as_bytes()))
    assert [a.content_type for a in facts.attachments] == [
        "message/rfc822",
        "application/octet-stream",
    ]
    assert facts.attachments[1].filename == "deep.exe"
    assert "inner text\n" in facts.texts


def test_text_attachment_is_not_body_text() -> None:
    msg = base("the body\n")
    msg.add_attachment("an attached note\n", filename="note.txt")
    facts = content_facts(MessageFacts.from_bytes(msg.as_bytes()))
    assert facts.texts == ("the body\n",)
    assert [a.filename for a in facts.attachments] == ["note.txt"]


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (
            b'Content-Type: multipart/mixed; boundary="b"\n\n--b\n\nno closing boundary\n',
            "close boundary not found",
        ),
        (b"Content-Type: multipart/mixed\n\nno boundary parameter\n", "no boundary in multipart"),
        (
            b'Content-Type: multipart/mixed; boundary="b"\n\nno start boundary at all\n',
            "start boundary not found",
        ),
        (
            b"Content-Type: text/plain; charset=x-unknown-42\n\nbody\n",
            "unknown charset 'x-unknown-42'",
        ),
        (
            b"Content-Type: application/pdf\nContent-Transfer-Encoding: base64\n\nJVBER!!!i0x=Lj\n",
            "invalid base64",
        ),
    ],
)
def test_malformed_mime_is_recorded_not_raised(raw: bytes, error: str) -> None:
    facts = content_facts(MessageFacts.from_bytes(b"Subject: broken\n" + raw))
    assert facts.mime_error is not None and error in facts.mime_error
    assert facts.as_extra()["mime_error"] == facts.mime_error


def test_unparsable_nesting_is_recorded() -> None:
    depth = 2000
    raw = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (level, level)
        for level in range(depth)
    )
    facts = content_facts(MessageFacts.from_bytes(raw + b"\nend\n"))
    assert facts.mime_error is not None


def test_part_count_is_bounded() -> None:
    parts = b"".join(
        b"--b\nContent-Type: application/octet-stream\n\nx\n" for _ in range(MAX_PARTS + 5)
    )
    raw = b'Content-Type: multipart/mixed; boundary="b"\n\n' + parts + b"--b--\n"
    facts = analyze(raw)
    assert len(facts.attachments) == MAX_PARTS - 1  # the multipart container is a part too
    assert facts.mime_error is not None and f"more than {MAX_PARTS}" in facts.mime_error


def test_as_extra() -> None:
    msg = base()
    msg.add_attachment(b"x", maintype="application", subtype="octet-stream", filename="x.bin")
    extra = content_facts(MessageFacts.from_bytes(msg.as_bytes())).as_extra()
    assert extra == {"mime_error": None, "attachment_count": 1, "attachment_names": ["x.bin"]}


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"Content-Type: multipart/mixed; boundary=b\n",
                b'Content-Type: multipart/alternative; boundary=""\n',
                b"Content-Type: text/html; charset=\xff\n",
                b"Content-Transfer-Encoding: base64\n",
                b"Content-Transfer-Encoding: quoted-printable\n",
                b"Content-Disposition: attachment; filename*0*=bad''%ZZ; filename*2=x\n",
                b"Content-Type: message/rfc822\n",
                b"\n",
                b"--b\n",
                b"--b--\n",
                b"<p>text</p>\n",
                b"=?utf-8?b?invalid?=\n",
                b"PK\x03\x04\x00\x00",
                b"MZ\x00\x00",
            ]
        )
        | st.binary(max_size=40),
        max_size=30,
    )
)
def test_random_mime_never_raises(chunks: list[bytes]) -> None:
    facts = analyze(b"".join(chunks))
    assert isinstance(facts.mime_errors, tuple)
