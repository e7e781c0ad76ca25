"""`mailgate user|alias|domain` run as real subprocesses against a temporary data directory."""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailgate.core.users.sqlite import SQLiteUserStore


def _mailgate() -> str:
    beside = Path(sys.executable).parent / "mailgate"
    if beside.exists():
        return str(beside)
    found = shutil.which("mailgate")
    if found is None:
        pytest.fail("the mailgate console script is not installed (run ./bootstrap.sh test)")
    return found


MAILGATE = _mailgate()


def _env(**extra: str) -> dict[str, str]:
    # The developer's own MAILGATE_* settings must not leak into the commands under test.
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAILGATE_")}
    env.update(extra)
    return env


class Mailgate:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.env = _env()

    def __call__(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        argv = [MAILGATE, *args, "--data-dir", str(self.data_dir)]
        return subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.data_dir.parent,
            timeout=60,
            check=False,
        )

    def ok(self, *args: str, stdin: str = "") -> str:
        result = self(*args, stdin=stdin)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        return result.stdout

    def fails(self, *args: str, stdin: str = "") -> str:
        result = self(*args, stdin=stdin)
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert result.stdout == ""
        assert result.stderr.startswith("mailgate: ")
        return result.stderr

    def store(self) -> SQLiteUserStore:
        return SQLiteUserStore(self.data_dir / "users.sqlite3")


@pytest.fixture
def mailgate(tmp_path: Path) -> Mailgate:
    return Mailgate(tmp_path / "data")


@pytest.fixture
def with_domain(mailgate: Mailgate) -> Mailgate:
    assert mailgate.ok("domain", "add", "Example.COM") == "added domain example.com\n"
    return mailgate


def test_domain_commands(mailgate: Mailgate) -> None:
    assert mailgate.ok("domain", "list") == ""
    mailgate.ok("domain", "add", "example.com")
    mailgate.ok("domain", "add", "example.org")
    assert "already exists" in mailgate.fails("domain", "add", "EXAMPLE.org")
    assert "invalid domain" in mailgate.fails("domain", "add", "exa mple.org")
    mailgate.env["MAILGATE_LOCAL_DOMAINS"] = "example.net,example.org"
    assert mailgate.ok("domain", "list").splitlines() == [
        "example.com",
        "example.net (config)",
        "example.org (also in config)",
    ]
    assert "remove it there" in mailgate.fails("domain", "del", "example.net")
    assert mailgate.ok("domain", "del", "example.org") == "deleted domain example.org\n"
    assert "remove it there" in mailgate.fails("domain", "del", "example.org")
    del mailgate.env["MAILGATE_LOCAL_DOMAINS"]
    assert "no such domain" in mailgate.fails("domain", "del", "example.org")
    path = mailgate.data_dir / "users.sqlite3"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(mailgate.data_dir.stat().st_mode) == 0o700


def test_user_add_needs_a_local_domain(mailgate: Mailgate) -> None:
    message = mailgate.fails("user", "add", "alice@example.com", stdin="pw\n")
    assert "run `mailgate domain add example.com`" in message
    # A domain set in the configuration is local too.
    config = mailgate.data_dir.parent / "mailgate.yaml"
    config.write_text("local_domains: [example.com]\n")
    mailgate.ok("user", "add", "alice@example.com", "--config", str(config), stdin="pw\n")
    with mailgate.store() as store:
        assert store.list_users() == ["alice@example.com"]


def test_user_lifecycle(with_domain: Mailgate) -> None:
    mailgate = with_domain
    out = mailgate.ok("user", "add", "Alice@Example.com", stdin="correct horse \n")
    assert out == "added user alice@example.com\n"
    assert "already exists" in mailgate.fails("user", "add", "alice@example.com", stdin="x\n")
    mailgate.ok("user", "add", "bob@example.com", stdin="bobpw")
    assert mailgate.ok("user", "list").splitlines() == ["alice@example.com", "bob@example.com"]
    with mailgate.store() as store:
        # Only the line ending is stripped: the trailing space belongs to the password.
        assert store.authenticate("alice@example.com", "correct horse ") == "alice@example.com"
        assert store.authenticate("alice@example.com", "correct horse") is None
        assert store.authenticate("bob@example.com", "bobpw") == "bob@example.com"

    out = mailgate.ok("user", "passwd", "alice@example.com", stdin="new one\nignored\n")
    assert out == "changed the password of alice@example.com\n"
    with mailgate.store() as store:
        assert store.authenticate("alice@example.com", "new one") == "alice@example.com"
        assert store.authenticate("alice@example.com", "correct horse ") is None
    assert "no such user" in mailgate.fails("user", "passwd", "carol@example.com", stdin="x\n")

    assert mailgate.ok("user", "del", "bob@example.com") == "deleted user bob@example.com\n"
    assert "no such user" in mailgate.fails("user", "del", "bob@example.com")
    assert mailgate.ok("user", "list") == "alice@example.com\n"


def test_password_is_never_taken_from_argv(with_domain: Mailgate) -> None:
    result = with_domain("user", "add", "alice@example.com", "s3cret-on-argv")
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr
    result = with_domain("user", "add", "alice@example.com", "--password", "s3cret")
    assert result.returncode == 2
    assert with_domain.ok("user", "list") == ""


def test_empty_password_is_refused(with_domain: Mailgate) -> None:
    assert "empty password" in with_domain.fails("user", "add", "alice@example.com", stdin="")
    assert "empty password" in with_domain.fails("user", "add", "alice@example.com", stdin="\n")
    assert with_domain.ok("user", "list") == ""


def test_bad_address(with_domain: Mailgate) -> None:
    message = with_domain.fails("user", "add", "alice", stdin="pw\n")
    assert "invalid address 'alice': expected local@domain" in message


def test_alias_commands(with_domain: Mailgate) -> None:
    mailgate = with_domain
    mailgate.ok("user", "add", "alice@example.com", stdin="pw\n")
    out = mailgate.ok("alias", "add", "Sales@example.com", "alice@example.com")
    assert out == "added alias sales@example.com -> alice@example.com\n"
    mailgate.ok("alias", "add", "sales@example.com", "partner@remote.org")
    mailgate.ok("alias", "add", "@example.com", "alice@example.com")
    assert "is not local" in mailgate.fails("alias", "add", "x@remote.org", "alice@example.com")
    assert "already exists" in mailgate.fails(
        "alias", "add", "sales@example.com", "alice@example.com"
    )
    assert mailgate.ok("alias", "list").splitlines() == [
        "@example.com -> alice@example.com",
        "sales@example.com -> alice@example.com",
        "sales@example.com -> partner@remote.org",
    ]
    with mailgate.store() as store:
        assert store.resolve("sales@example.com") == ["alice@example.com", "partner@remote.org"]
        assert store.resolve("whoever@example.com") == ["alice@example.com"]

    out = mailgate.ok("alias", "del", "sales@example.com", "partner@remote.org")
    assert out == "deleted alias sales@example.com -> partner@remote.org\n"
    assert "no such alias" in mailgate.fails(
        "alias", "del", "sales@example.com", "partner@remote.org"
    )
    assert mailgate.ok("alias", "del", "@example.com") == "deleted alias @example.com (1 target)\n"

    assert "still used by 1 user and 1 alias" in mailgate.fails("domain", "del", "example.com")
    out = mailgate.ok("user", "del", "alice@example.com")
    assert out.splitlines() == [
        "deleted user alice@example.com",
        "deleted alias sales@example.com -> alice@example.com",
    ]
    assert mailgate.ok("alias", "list") == ""
    mailgate.ok("domain", "del", "example.com")


# -- on a terminal: getpass, twice -------------------------------------------------------


def _on_tty(argv: list[str], env: dict[str, str], answers: list[str]) -> tuple[int, str]:
    """Run argv with a pseudo-terminal as its controlling tty; answer each password prompt."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child only execs
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    output = b""
    answered = 0
    deadline = time.monotonic() + 60
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"no exit within 60 s; output so far: {output!r}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if answered < len(answers) and output.count(b"password: ") > answered:
                os.write(fd, answers[answered].encode() + b"\n")
                answered += 1
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_password_prompt_on_a_terminal(with_domain: Mailgate) -> None:
    argv = [MAILGATE, "user", "add", "alice@example.com", "--data-dir", str(with_domain.data_dir)]
    code, output = _on_tty(argv, with_domain.env, ["tty secret", "tty secret"])
    assert code == 0, output
    assert "New password: " in output
    assert "Retype new password: " in output
    assert "tty secret" not in output  # not echoed
    assert "added user alice@example.com" in output
    with with_domain.store() as store:
        assert store.authenticate("alice@example.com", "tty secret") == "alice@example.com"


def test_password_prompt_mismatch(with_domain: Mailgate) -> None:
    argv = [MAILGATE, "user", "add", "alice@example.com", "--data-dir", str(with_domain.data_dir)]
    code, output = _on_tty(argv, with_domain.env, ["one", "two"])
    assert code == 1
    assert "mailgate: the passwords do not match" in output
    assert with_domain.ok("user", "list") == ""


def test_user_quota_commands(with_domain: Mailgate) -> None:
    mg = with_domain
    domain = "example.com"
    mg.ok("user", "add", f"a@{domain}", stdin="pw\n")
    mg.ok("user", "add", f"b@{domain}", stdin="pw\n")
    out = mg.ok(
        "user",
        "quota",
        "set",
        f"a@{domain}",
        "--storage",
        "10K",
        "--max-attachment",
        "2M",
        "--max-attachments",
        "5",
    )
    assert out == (
        f"limits of a@{domain}: storage quota 10K, largest attachment 2M, "
        "attachments per message 5\n"
    )
    mg.ok("user", "quota", "set", f"@{domain}", "--storage", "1G")
    # Usage comes from the Maildir: 12000 bytes, one by its ,S= name, one by stat.
    new = mg.data_dir / "mail" / domain / "a" / "new"
    new.mkdir(parents=True)
    (new / "1.M1P1.host,S=8000").write_bytes(b"x")
    (new / "2.M1P1.host").write_bytes(b"x" * 4000)
    show = mg.ok("user", "quota", "show", f"a@{domain}")
    assert "storage quota:            10K (user)" in show
    assert "largest attachment:       2M (user)" in show
    assert (
        "used:                     11.7K (12000 bytes) in 2 messages, 117.2% of the quota" in show
    )
    show = mg.ok("user", "quota", "show", f"b@{domain}")
    assert "storage quota:            1G (domain default)" in show
    assert "largest attachment:       unlimited (not set)" in show
    listing = mg.ok("user", "quota", "list")
    assert listing.splitlines()[0].split() == [
        "USER",
        "USED",
        "QUOTA",
        "USE%",
        "MAX-ATTACHMENT",
        "MAX-ATTACHMENTS",
    ]
    assert listing.splitlines()[1].split() == [
        f"a@{domain}",
        "11.7K",
        "10K",
        "117%",
        "2M",
        "5",
        "OVER",
    ]
    assert mg.ok("user", "quota", "list", "--over").count("\n") == 2  # header + a only
    # Clearing: 'none' falls back to the domain's default; 'unlimited' overrides it.
    mg.ok("user", "quota", "set", f"a@{domain}", "--storage", "none")
    assert "1G (domain default)" in mg.ok("user", "quota", "show", f"a@{domain}")
    mg.ok("user", "quota", "set", f"a@{domain}", "--storage", "unlimited")
    assert "storage quota:            unlimited (user)" in mg.ok(
        "user", "quota", "show", f"a@{domain}"
    )
    assert mg.ok("user", "quota", "list", "--over") == ""
    mg.ok("user", "quota", "clear", f"a@{domain}")
    with mg.store() as store:
        assert store.limits(f"a@{domain}").is_empty()
    assert "no such user: c@example.com" in mg.fails("user", "quota", "show", f"c@{domain}")
    assert "nothing to set" in mg.fails("user", "quota", "set", f"a@{domain}")
    assert "is not local" in mg.fails("user", "quota", "set", "@other.example", "--storage", "1M")
    bad = mg("user", "quota", "set", f"a@{domain}", "--storage", "12X")
    assert bad.returncode == 2 and "expected a size such as 100M or 2G" in bad.stderr
