"""The benchmark suite still works: `python -m bench --smoke` end to end, every scenario.

The smoke mode runs scenarios A-G against every peer (smtp-sink, stock aiosmtpd, the
mailgate core on both loops, `mailgate serve`, Postfix, no-op milters, a policy daemon
alone, the six-daemon chain against Postfix with postgrey, clamav-milter and
spamass-milter, both MTAs relaying to smtp-sink, the SPF/DKIM/DMARC/ARC daemons against
Postfix with opendkim and opendmarc) with tiny counts and one repeat. This
checks that it finishes, writes JSON, Markdown and PNG charts, and that every figure is
there and sane. It says nothing about whether a target is met.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PEERS = {
    "A": {"smtp-sink", "aiosmtpd", "mailgate-asyncio", "mailgate-uvloop"},
    "B": {"mailgate", "postfix"},
    "C": {"mailgate", "postfix"},
    "D": {"mailgate", "aiosmtpd"},
    "E": {"mailgate-chain", "postfix-chain"},
    "F": {"mailgate", "postfix"},
    "G": {"mailgate-chain", "postfix-chain"},
}


def _processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or environment names ``text``."""
    found = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for name in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{entry}/{name}").read_bytes()
            except OSError:
                continue
            if needle in data:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                found.append(f"{entry}: {cmdline.decode(errors='replace')[:200]}")
                break
    return found


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark's Postfix peer must run as root")
def test_bench_smoke(tmp_path: Path) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    argv = [sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--work", str(work)]
    proc = subprocess.run(
        [*argv, "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=200, check=False
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert not _processes_mentioning(str(tmp_path)), "benchmark processes left running"

    result = json.loads((out / "latest.json").read_text())
    stamp = result["meta"]["timestamp"]
    assert (out / f"{stamp}.json").is_file()
    markdown = (out / f"{stamp}.md").read_text()
    assert markdown == (out / "latest.md").read_text()
    for key in "ABCDEFG":
        png = out / f"{stamp}-{key}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert (out / f"latest-{key}.png").is_file()
        assert f"## {key}. " in markdown
    assert "## Targets" in markdown
    assert result["failed"] == {}
    assert result["meta"]["smoke"] is True
    scenarios = result["scenarios"]
    assert set(scenarios) == set("ABCDEFG")
    for key, peers in PEERS.items():
        assert set(scenarios[key]["peers"]) == peers, key

    # A: every case, both generators, every peer moved mail; bench.load has latencies.
    generators = {case["generator"] for case in scenarios["A"]["cases"]}
    assert generators == {"pyload", "smtp-source"}
    for case in scenarios["A"]["cases"]:
        for peer in PEERS["A"]:
            median = case["median"][peer]
            assert median["rate"] > 0, (case["id"], peer)
            assert median["errors"] == 0, (case["id"], peer)
            assert median["server_cpu_s"] >= 0 and median["peak_rss_mb"] > 0, (case["id"], peer)
            if case["generator"] == "pyload":
                assert 0 < median["latency_ms.p50"] <= median["latency_ms.p99"], (case["id"], peer)
        assert case["ratios"]["mailgate-asyncio/aiosmtpd"] > 0

    # B: both MTAs accepted and delivered everything.
    for case in scenarios["B"]["cases"]:
        for peer in PEERS["B"]:
            median = case["median"][peer]
            assert median["rate"] > 0 and median["delivery_rate"] > 0, (case["id"], peer)
            assert median["errors"] == 0, (case["id"], peer)
        for runs in case["runs"].values():
            assert all(run["delivered"] == run["messages"] for run in runs), case["id"]

    # C: a point per milter count for both MTAs, and a fitted cost per hop.
    c = scenarios["C"]
    assert [p["milters"] for p in c["points"]] == c["milter_counts"]
    for point in c["points"]:
        for peer in PEERS["C"]:
            assert point["median"][peer]["rate"] > 0, (point["milters"], peer)
            assert point["median"][peer]["errors"] == 0, (point["milters"], peer)
    for peer in PEERS["C"]:
        assert c["fits"][f"{peer}.ms_per_msg"] is not None, peer

    # D: the probe got through to both peers while the big messages streamed in.
    for peer in PEERS["D"]:
        median = scenarios["D"]["median"][peer]
        assert median["messages"] > 0, peer
        assert median["probe.messages"] > 0 and median["probe.latency_ms.p99"] > 0, peer

    # E: each smoke daemon measured against no daemon; both chains moved every message.
    e = scenarios["E"]
    assert set(e["per_daemon"]) == {"clamav"}
    for name, point in e["per_daemon"].items():
        for peer in (name, "none"):
            assert point["median"][peer]["rate"] > 0, (name, peer)
            assert point["median"][peer]["errors"] == 0, (name, peer)
        assert e["cost_per_message"][name]["ms_per_msg"] is not None, name
    assert e["cost_per_message"]["clamav"]["backend_cpu_ms_per_msg"] > 0
    for peer in PEERS["E"]:
        assert e["chain"]["median"][peer]["rate"] > 0, peer
        assert e["chain"]["median"][peer]["errors"] == 0, peer
        for run in e["chain"]["runs"][peer]:
            assert run["delivered"] == run["messages"], peer
    assert all(value is not None for value in e["ratios"].values())

    # F: both MTAs relayed every accepted message to the sink; CPU per message measured.
    f = scenarios["F"]
    for peer in PEERS["F"]:
        median = f["median"][peer]
        assert median["rate"] > 0 and median["relay_rate"] > 0, peer
        assert median["errors"] == 0 and median["server_cpu_ms_per_msg"] > 0, peer
        for run in f["runs"][peer]:
            assert run["delivered"] == run["messages"], peer
    assert all(value is not None for value in f["ratios"].values())

    # G: DKIM crypto measured for both key types; both chains moved every message, and the
    # pre-signed message passed SPF, DKIM and DMARC on both sides (p=reject refuses a fail).
    g = scenarios["G"]
    for label in ("rsa-2048", "ed25519"):
        assert g["crypto"][label]["sign_us"] > 0 and g["crypto"][label]["verify_us"] > 0, label
    for peer in PEERS["G"]:
        median = g["chain"]["median"][peer]
        assert median["rate"] > 0 and median["errors"] == 0, peer
        assert median["server_cpu_ms_per_msg"] > 0, peer
        for run in g["chain"]["runs"][peer]:
            assert run["delivered"] == run["messages"], peer
        verdict = g["chain"]["authentication_results"][peer]
        for method in ("spf=pass", "dkim=pass", "dmarc=pass"):
            assert method in verdict, (peer, verdict)
    assert g["ratios"]["mailgate spf+dkim+dmarc+arc / postfix opendkim+opendmarc"] > 0

    assert {t["id"] for t in result["targets"]} == {"A1", "A2", "A3", "B", "C", "D"}
    assert all(t["value"] is not None for t in result["targets"])
