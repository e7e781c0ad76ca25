"""`python -m bench`: run the scenarios, write JSON, Markdown and PNG charts.

    .venv/bin/python -m bench [--smoke] [--scenarios A,B,C,D,E,F,G] [--repeats N] [--out DIR]

Runs as root (Postfix's master must). Full run: ~10-15 minutes on 2 cores; ``--smoke``:
tiny counts, one repeat, well under a minute, to keep the suite working in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import (
    charts,
    report,
    scenario_a,
    scenario_b,
    scenario_c,
    scenario_d,
    scenario_e,
    scenario_f,
    scenario_g,
    servers,
)
from bench.common import Settings

SCENARIOS = {
    "A": scenario_a.run,
    "B": scenario_b.run,
    "C": scenario_c.run,
    "D": scenario_d.run,
    "E": scenario_e.run,
    "F": scenario_f.run,
    "G": scenario_g.run,
}
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_WORK = Path("/var/tmp/mailgate-bench")


def fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts)."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) >= 3:
                    mount = parts[1]
                    inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
                    if inside and len(mount) >= len(best):
                        best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _postfix_version() -> str:
    try:
        out = subprocess.run(
            ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny counts, 1 repeat (CI)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, e.g. A,C")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (smoke: 1)")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results[/smoke]")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch dir (not tmpfs)")
    ap.add_argument("--keep-work", action="store_true", help="keep logs and mail afterwards")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})")
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 3
    if args.out is None:
        args.out = RESULTS / "smoke" if args.smoke else RESULTS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    work = args.work.resolve() / stamp
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    # Postfix's service users must reach their directories under the work dir.
    servers.test_peers().make_traversable(work)
    settings = Settings(smoke=args.smoke, repeats=args.repeats, work=work, verbose=not args.quiet)
    kind = fs_type(work)
    if kind == "tmpfs":
        settings.say(f"warning: {work} is on tmpfs: fsync costs nothing there (use --work)")
    if os.geteuid() != 0:
        settings.say("warning: not root: Postfix (B, C) cannot run")
    result: dict[str, Any] = {
        "meta": {
            "timestamp": stamp,
            "smoke": args.smoke,
            "repeats": args.repeats,
            "scenarios": args.scenarios,
            "cpus": os.cpu_count(),
            "kernel": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(),
            "postfix": _postfix_version(),
            "aiosmtpd": _version("aiosmtpd"),
            "uvloop": _version("uvloop"),
            "mailgate": _version("mailgate"),
            "loadavg_start": os.getloadavg(),
            "work": str(work),
            "work_fs": kind,
        },
        "scenarios": {},
        "failed": {},
    }
    started = time.monotonic()
    for key in args.scenarios:
        settings.say(f"scenario {key}: starting")
        scenario_start = time.monotonic()
        try:
            result["scenarios"][key] = SCENARIOS[key](settings)
            result["scenarios"][key]["elapsed_s"] = time.monotonic() - scenario_start
        except Exception:
            result["failed"][key] = traceback.format_exc()
            settings.say(f"scenario {key} FAILED:\n{result['failed'][key]}")
        settings.say(f"scenario {key}: {time.monotonic() - scenario_start:.0f} s")
    result["meta"]["elapsed_s"] = time.monotonic() - started
    result["meta"]["loadavg_end"] = os.getloadavg()
    result["targets"] = report.evaluate(result["scenarios"])
    paths = write(result, args.out, stamp)
    if not args.keep_work:
        servers.remove_tree(work)
    for path in paths:
        settings.say(f"wrote {path}")
    if not args.quiet:
        print(report.markdown(result))
    return 1 if result["failed"] else 0


def write(result: dict[str, Any], out: Path, stamp: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stamp}.json"
    md_path = out / f"{stamp}.md"
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md_path.write_text(report.markdown(result))
    pngs = charts.write_charts(result["scenarios"], out, stamp)
    paths = [json_path, md_path, *pngs]
    shutil.copyfile(json_path, out / "latest.json")
    shutil.copyfile(md_path, out / "latest.md")
    for png in pngs:
        shutil.copyfile(png, out / png.name.replace(stamp, "latest"))
    return paths


if __name__ == "__main__":
    sys.exit(main())
