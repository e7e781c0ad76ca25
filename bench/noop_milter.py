"""A no-op milter for scenario C: pymilter (libmilter), every stage answered CONTINUE.

    python -m bench.noop_milter inet:PORT@127.0.0.1 [NAME]

It asks for every event (connect, helo, envelope, each header, end of headers, body,
end of message) so that each hop costs a full milter conversation, and changes nothing.
The same processes serve mailgate and Postfix in one run.
"""

from __future__ import annotations

import sys
from typing import Any

import Milter


class Noop(Milter.Base):  # type: ignore[misc]
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return Milter.CONTINUE

    def hello(self, hostname: str) -> int:
        return Milter.CONTINUE

    def envfrom(self, sender: str, *params: str) -> int:
        return Milter.CONTINUE

    def envrcpt(self, to: str, *params: str) -> int:
        return Milter.CONTINUE

    def data(self) -> int:
        return Milter.CONTINUE

    def header(self, field: str, value: str) -> int:
        return Milter.CONTINUE

    def eoh(self) -> int:
        return Milter.CONTINUE

    def body(self, chunk: bytes) -> int:
        return Milter.CONTINUE

    def eom(self) -> int:
        return Milter.CONTINUE

    def abort(self) -> int:
        return Milter.CONTINUE

    def close(self) -> int:
        return Milter.CONTINUE


def main() -> None:
    spec = sys.argv[1]
    name = sys.argv[2] if len(sys.argv) > 2 else "noop"
    Milter.factory = Noop
    Milter.set_flags(0)
    print(f"noop milter {name} on {spec}", flush=True)
    Milter.runmilter(name, spec, timeout=60)


if __name__ == "__main__":
    main()
