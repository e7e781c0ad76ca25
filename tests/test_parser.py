"""The SMTP command-line parser: fixed cases and hypothesis-generated input."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.core.smtp.parser import (
    CommandSyntaxError,
    parse_mail_from,
    parse_params,
    parse_rcpt_to,
    split_command,
)

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"
atoms = st.text(alphabet=ATEXT, min_size=1, max_size=12)
local_parts = st.lists(atoms, min_size=1, max_size=3).map(".".join).filter(lambda s: len(s) <= 64)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
keywords = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,8}", fullmatch=True)
values = st.text(
    alphabet=[chr(c) for c in range(33, 127) if chr(c) != "="], min_size=1, max_size=10
)


@given(local=local_parts, domain=domains)
def test_valid_mailbox_round_trips(local: str, domain: str) -> None:
    path = parse_mail_from(f"FROM:<{local}@{domain}>")
    assert path.address == f"{local}@{domain}"
    assert (path.local, path.domain) == (local, domain)
    assert parse_rcpt_to(f"TO:<{local}@{domain}>").address == f"{local}@{domain}"


@given(
    local=local_parts,
    domain=domains,
    params=st.dictionaries(keywords.map(str.upper), st.none() | values, max_size=4),
)
def test_parameters_are_parsed_with_values_kept(
    local: str, domain: str, params: dict[str, str | None]
) -> None:
    text = " ".join(k if v is None else f"{k}={v}" for k, v in params.items())
    path = parse_mail_from(f"FROM:<{local}@{domain}> {text}".rstrip())
    assert path.params == params


@settings(max_examples=500)
@given(st.text(max_size=300))
def test_arbitrary_text_never_raises_anything_but_a_reply(text: str) -> None:
    for parse in (parse_mail_from, parse_rcpt_to):
        try:
            path = parse(text)
        except CommandSyntaxError as exc:
            assert exc.reply.code in (501, 553, 555)
            assert exc.reply.enhanced.startswith("5.")
        else:
            assert path.address == "" or "@" in path.address or path.address == "Postmaster"
    try:
        command = split_command(text)
    except CommandSyntaxError as exc:
        assert exc.reply.code == 500
    else:
        assert command.verb.isalpha() and command.verb.isupper()


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decoded_never_crash(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    with pytest.raises(CommandSyntaxError) if not text.upper().startswith("FROM:") else _maybe():
        parse_mail_from(text)


class _maybe:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, tb: object) -> bool:
        return kind is None or kind is CommandSyntaxError


@pytest.mark.parametrize(
    ("arg", "address"),
    [
        ("FROM:<>", ""),
        ("from:<a@b.example>", "a@b.example"),
        ("FROM: <a@b.example>", "a@b.example"),
        ("FROM:a@b.example", "a@b.example"),
        ('FROM:<"john doe"@b.example>', '"john doe"@b.example'),
        ("FROM:<@relay.example,@r2.example:a@b.example>", "a@b.example"),
        ("FROM:<a@[192.0.2.1]>", "a@[192.0.2.1]"),
        ("FROM:<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]"),
        ("FROM:<jörg@bücher.example> SMTPUTF8", "jörg@bücher.example"),
    ],
)
def test_accepted_reverse_paths(arg: str, address: str) -> None:
    assert parse_mail_from(arg).address == address


@pytest.mark.parametrize(
    ("arg", "code"),
    [
        ("FROM", 501),
        ("TO:<a@b.example>", 501),
        ("FROM:<a@b.example", 553),
        ("FROM:<a b@c.example>", 553),
        ("FROM:<a@>", 553),
        ("FROM:<@b.example>", 553),
        ("FROM:<a..b@c.example>", 553),
        ("FROM:<a@-bad.example>", 553),
        ("FROM:<a@b.example> SIZE=", 501),
        ("FROM:<a@b.example> SIZE=1 SIZE=2", 501),
        ("FROM:<a@[999.1.1.1]>", 553),
        ("FROM:<" + "x" * 65 + "@b.example>", 553),
    ],
)
def test_rejected_reverse_paths(arg: str, code: int) -> None:
    with pytest.raises(CommandSyntaxError) as info:
        parse_mail_from(arg)
    assert info.value.reply.code == code


def test_null_recipient_and_postmaster() -> None:
    with pytest.raises(CommandSyntaxError) as info:
        parse_rcpt_to("TO:<>")
    assert info.value.reply.code == 553
    assert parse_rcpt_to("TO:<postmaster>").address == "Postmaster"


def test_params_keyword_case_is_folded() -> None:
    assert parse_params("body=8BITMIME size=10 SMTPUTF8") == {
        "BODY": "8BITMIME",
        "SIZE": "10",
        "SMTPUTF8": None,
    }


def test_split_command() -> None:
    command = split_command("mail FROM:<a@b.example>")
    assert (command.verb, command.arg) == ("MAIL", "FROM:<a@b.example>")
    with pytest.raises(CommandSyntaxError):
        split_command("   ")
    with pytest.raises(CommandSyntaxError):
        split_command("MA1L x")


@pytest.mark.parametrize(
    "parse",
    [
        lambda: split_command("A\n"),
        lambda: split_command("NOOP\n"),
        lambda: parse_mail_from("<a\n@example.test>"),
        lambda: parse_rcpt_to("<bob@example.test\n>"),
        lambda: parse_params("SIZE\n=10"),
    ],
)
def test_a_line_break_is_never_part_of_a_verb_path_or_keyword(parse) -> None:
    # "$" in a Python regex also matches before a final "\n": every check must end at \Z.
    with pytest.raises(CommandSyntaxError):
        parse()
