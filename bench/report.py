"""The targets of the issue, judged on one run's ratios; and the Markdown report."""

from __future__ import annotations

from typing import Any

from bench.common import size_label

LOOPS = ("mailgate-asyncio", "mailgate-uvloop")
GENERATORS = ("pyload", "smtp-source")
GENERATOR_NAMES = {"pyload": "bench.load", "smtp-source": "smtp-source"}


def _pick_a(cases: list[dict[str, Any]], size: int, generator: str) -> dict[str, Any] | None:
    """The case of this size with connection reuse and the most sessions."""
    found = [c for c in cases if c["size"] == size and c["reuse"] and c["generator"] == generator]
    return max(found, key=lambda c: c["sessions"]) if found else None


def _target(
    tid: str,
    text: str,
    subject: str,
    value: float | None,
    threshold: float,
    op: str,
    where: str,
) -> dict[str, Any]:
    if value is None:
        met = None
    elif op == ">=":
        met = value >= threshold
    elif op == "<=":
        met = value <= threshold
    else:
        met = value < threshold
    return {
        "id": tid,
        "target": text,
        "subject": subject,
        "where": where,
        "value": value,
        "op": op,
        "threshold": threshold,
        "met": met,
    }


def evaluate(scenarios: dict[str, Any]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    a = scenarios.get("A")
    if a:
        for generator in GENERATORS:
            small = _pick_a(a["cases"], 1024, generator)
            big = _pick_a(a["cases"], 100 * 1024, generator)
            for loop in LOOPS:
                if small:
                    where = f"{small['id']}"
                    targets.append(
                        _target(
                            "A1", ">= 3x stock aiosmtpd", loop,
                            small["ratios"].get(f"{loop}/aiosmtpd"), 3.0, ">=", where,
                        )
                    )  # fmt: skip
                    targets.append(
                        _target(
                            "A2", ">= 0.5x smtp-sink", loop,
                            small["ratios"].get(f"{loop}/smtp-sink"), 0.5, ">=", where,
                        )
                    )  # fmt: skip
                if big:
                    targets.append(
                        _target(
                            "A3", ">= 5x stock aiosmtpd on 100 KB", loop,
                            big["ratios"].get(f"{loop}/aiosmtpd"), 5.0, ">=", big["id"],
                        )
                    )  # fmt: skip
    b = scenarios.get("B")
    if b:
        for case in b["cases"]:
            targets.append(
                _target(
                    "B", ">= 1.0x Postfix acceptance (aim 2x)", "mailgate",
                    case["ratios"].get("mailgate/postfix"), 1.0, ">=", case["id"],
                )
            )  # fmt: skip
    c = scenarios.get("C")
    if c:
        targets.append(
            _target(
                "C", "cost per milter hop <= Postfix's", "mailgate",
                c["ratios"].get("mailgate/postfix per-hop time"), 1.0, "<=",
                "slope of ms/message over N (ratio mailgate/Postfix)",
            )
        )  # fmt: skip
    d = scenarios.get("D")
    if d:
        p99 = d["median"].get("mailgate", {}).get("probe.latency_ms.p99")
        targets.append(
            _target("D", "probe p99 < 50 ms", "mailgate", p99, 50.0, "<", "probe p99 in ms")
        )
    return targets


# -- Markdown ------------------------------------------------------------------------------


def _f(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if digits == 0 and abs(value) < 10:
            return f"{value:.2f}" if abs(value) < 1 else f"{value:.1f}"
        return f"{value:.{digits}f}"
    return str(value)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _status(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "n/a"}[met]


def targets_table(targets: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| target | peer | measured at | value | status |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t in targets:
        if t["id"] in ("A1", "A2", "A3", "B"):
            value = _ratio(t["value"])
        elif t["id"] == "C":
            value = f"{_ratio(t['value'])} (<= 1 wanted)"
        else:
            value = f"{_f(t['value'], 1)} ms"
        lines.append(
            f"| {t['id']}: {t['target']} | {t['subject']} | {t['where']} | {value} | "
            f"{_status(t['met'])} |"
        )
    return lines


def _scenario_a(a: dict[str, Any]) -> list[str]:
    out = [f"## {a['title']}", ""]
    out.append(
        "Medians over the repeats. msg/s is the figure the ratios use; CPU is the server "
        "process tree's user+system seconds per 1,000 messages; latency (bench.load only) "
        "runs from MAIL to the 250 after the dot."
    )
    for generator in GENERATORS:
        cases = [c for c in a["cases"] if c["generator"] == generator]
        if not cases:
            continue
        out += [
            "",
            f"Load from {GENERATOR_NAMES[generator]}:",
            "",
            "| case | peer | msg/s | CPU s/1k msgs | p50 ms | p99 ms | peak RSS MB "
            "| vs aiosmtpd | vs smtp-sink |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for case in cases:
            for peer in a["peers"]:
                m = case["median"].get(peer, {})
                vs_a = case["ratios"].get(f"{peer}/aiosmtpd")
                vs_s = case["ratios"].get(f"{peer}/smtp-sink")
                label = case["id"].rsplit("/", 1)[0]
                out.append(
                    f"| {label} | {peer} | {_f(m.get('rate'), 0)} | {_f(m.get('cpu_per_1k'), 3)} "
                    f"| {_f(m.get('latency_ms.p50'), 1)} | {_f(m.get('latency_ms.p99'), 1)} "
                    f"| {_f(m.get('peak_rss_mb'), 0)} | {_ratio(vs_a) if vs_a else ''} "
                    f"| {_ratio(vs_s) if vs_s else ''} |"
                )
    return out


def _scenario_b(b: dict[str, Any]) -> list[str]:
    out = [f"## {b['title']}", ""]
    out.append(
        "Acceptance: messages acknowledged per second. Delivered: messages per second from "
        "the first MAIL until the last one is in the Maildir. CPU covers acceptance and "
        "delivery."
    )
    out += [
        "",
        "| case | load | peer | accepted msg/s | delivered msg/s | CPU s/1k msgs | p50 ms "
        "| p99 ms | peak RSS MB | mailgate/Postfix |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in b["cases"]:
        label = case["id"].rsplit("/", 1)[0]
        for peer in b["peers"]:
            m = case["median"].get(peer, {})
            ratio = _ratio(case["ratios"].get("mailgate/postfix")) if peer == "mailgate" else ""
            out.append(
                f"| {label} | {GENERATOR_NAMES[case['generator']]} | {peer} "
                f"| {_f(m.get('rate'), 0)} | {_f(m.get('delivery_rate'), 0)} "
                f"| {_f(m.get('cpu_per_1k'), 3)} | {_f(m.get('latency_ms.p50'), 1)} "
                f"| {_f(m.get('latency_ms.p99'), 1)} | {_f(m.get('peak_rss_mb'), 0)} | {ratio} |"
            )
    return out


def _scenario_c(c: dict[str, Any]) -> list[str]:
    out = [f"## {c['title']}", ""]
    out += [
        "| milters | peer | msg/s | ms/msg | server CPU ms/msg | milters' CPU ms/msg "
        "| p99 ms | peak RSS MB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for point in c["points"]:
        for peer in c["peers"]:
            m = point["median"].get(peer, {})
            out.append(
                f"| {point['milters']} | {peer} | {_f(m.get('rate'), 0)} "
                f"| {_f(m.get('ms_per_msg'), 3)} | {_f(m.get('server_cpu_ms_per_msg'), 3)} "
                f"| {_f(m.get('helper_cpu_ms_per_msg'), 3)} | {_f(m.get('latency_ms.p99'), 1)} "
                f"| {_f(m.get('peak_rss_mb'), 0)} |"
            )
    out += ["", "Cost per hop (least-squares slope over N):", ""]
    out += ["| peer | ms/msg per hop | server CPU ms/msg per hop |", "| --- | ---: | ---: |"]
    for peer in c["peers"]:
        t = c["fits"].get(f"{peer}.ms_per_msg") or {}
        u = c["fits"].get(f"{peer}.server_cpu_ms_per_msg") or {}
        out.append(f"| {peer} | {_f(t.get('per_hop'), 3)} | {_f(u.get('per_hop'), 3)} |")
    ratios = c["ratios"]
    out += [
        "",
        f"mailgate/Postfix per hop: time {_ratio(ratios.get('mailgate/postfix per-hop time'))}, "
        f"server CPU {_ratio(ratios.get('mailgate/postfix per-hop server CPU'))}.",
    ]
    return out


def _scenario_d(d: dict[str, Any]) -> list[str]:
    out = [f"## {d['title']}", ""]
    out += [
        "| peer | probe p50 ms | probe p99 ms | probe max ms | probes | bulk MB/s "
        "| server CPU s | peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for peer in d["peers"]:
        m = d["median"].get(peer, {})
        out.append(
            f"| {peer} | {_f(m.get('probe.latency_ms.p50'), 1)} "
            f"| {_f(m.get('probe.latency_ms.p99'), 1)} | {_f(m.get('probe.latency_ms.max'), 1)} "
            f"| {_f(m.get('probe.messages'), 0)} | {_f(m.get('bulk_mb_per_s'), 1)} "
            f"| {_f(m.get('server_cpu_s'), 2)} | {_f(m.get('peak_rss_mb'), 0)} |"
        )
    return out


def _scenario_e(e: dict[str, Any]) -> list[str]:
    out = [f"## {e['title']}", "", "Each daemon alone against no daemon, same run:", ""]
    out += [
        "| daemon | msg/s with | msg/s without | cost ms/msg | serve+daemon CPU ms/msg "
        "| backend CPU ms/msg |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, point in e["per_daemon"].items():
        cost = e["cost_per_message"].get(name, {})
        with_daemon = point["median"].get(name, {})
        without = point["median"].get("none", {})
        out.append(
            f"| {name} | {_f(with_daemon.get('rate'), 0)} | {_f(without.get('rate'), 0)} "
            f"| {_f(cost.get('ms_per_msg'), 3)} | {_f(cost.get('server_cpu_ms_per_msg'), 3)} "
            f"| {_f(cost.get('backend_cpu_ms_per_msg'), 3)} |"
        )
    out += ["", "The chain, same messages, same backends:", ""]
    out += [
        "| peer | msg/s | ms/msg | server CPU ms/msg | backend CPU ms/msg | p50 ms | p99 ms "
        "| peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for peer in e["peers"]:
        m = e["chain"]["median"].get(peer, {})
        out.append(
            f"| {peer} | {_f(m.get('rate'), 0)} | {_f(m.get('ms_per_msg'), 2)} "
            f"| {_f(m.get('server_cpu_ms_per_msg'), 3)} "
            f"| {_f(m.get('backend_cpu_ms_per_msg'), 3)} | {_f(m.get('latency_ms.p50'), 1)} "
            f"| {_f(m.get('latency_ms.p99'), 1)} | {_f(m.get('peak_rss_mb'), 0)} |"
        )
    out += [""]
    out += [f"- {label}: {_ratio(value)}" for label, value in e["ratios"].items()]
    return out


def _scenario_f(f: dict[str, Any]) -> list[str]:
    out = [f"## {f['title']}", ""]
    out += [
        "| peer | accepted msg/s | relayed msg/s | server CPU ms/msg | p50 ms | p99 ms "
        "| peak RSS MB | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for peer in f["peers"]:
        m = f["median"].get(peer, {})
        out.append(
            f"| {peer} | {_f(m.get('rate'), 0)} | {_f(m.get('relay_rate'), 0)} "
            f"| {_f(m.get('server_cpu_ms_per_msg'), 3)} | {_f(m.get('latency_ms.p50'), 1)} "
            f"| {_f(m.get('latency_ms.p99'), 1)} | {_f(m.get('peak_rss_mb'), 0)} "
            f"| {int(m.get('errors') or 0)} |"
        )
    out += [""]
    out += [f"- {label}: {_ratio(value)}" for label, value in f["ratios"].items()]
    out += [f"- {label} (paired): {_ratio(v)}" for label, v in f["paired_ratios"].items()]
    return out


def _scenario_g(g: dict[str, Any]) -> list[str]:
    out = [f"## {g['title']}", ""]
    out += [
        "DKIM cost per operation on a 10 KB message, in process, with the dkim daemon's "
        "functions and shipped settings (key record from memory, no DNS); median of "
        "per-repeat medians:",
        "",
        "| key | sign µs | verify µs | primitive sign µs, dkimpy | primitive sign µs, OpenSSL "
        "| iterations per repeat |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, cost in g["crypto"].items():
        out.append(
            f"| {label} | {_f(cost.get('sign_us'), 0)} | {_f(cost.get('verify_us'), 0)} "
            f"| {_f(cost.get('dkimpy_primitive_sign_us'), 0)} "
            f"| {_f(cost.get('openssl_primitive_sign_us'), 0)} | {cost.get('iterations')} |"
        )
    out += [
        "",
        "Primitive: the bare signature over a SHA-256 digest, as dkimpy computes it (RSA: "
        "big integers in Python; Ed25519: PyNaCl) and as OpenSSL does (opendkim's library).",
    ]
    out += [
        "",
        "The chain, same pre-signed RSA-2048 message, same DNS zone (DKIM verifier CPU: the "
        "dkim daemon's process, or opendkim's):",
        "",
        "| peer | msg/s | ms/msg | server CPU ms/msg | DKIM verifier CPU ms/msg | p50 ms "
        "| p99 ms | peak RSS MB | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    chain = g["chain"]
    for peer in g["peers"]:
        m = chain["median"].get(peer, {})
        out.append(
            f"| {peer} | {_f(m.get('rate'), 0)} | {_f(m.get('ms_per_msg'), 2)} "
            f"| {_f(m.get('server_cpu_ms_per_msg'), 3)} | {_f(m.get('dkim_cpu_ms_per_msg'), 3)} "
            f"| {_f(m.get('latency_ms.p50'), 1)} | {_f(m.get('latency_ms.p99'), 1)} "
            f"| {_f(m.get('peak_rss_mb'), 0)} | {int(m.get('errors') or 0)} |"
        )
    out += [""]
    out += [f"- {label}: {_ratio(value)}" for label, value in g["ratios"].items()]
    out += [f"- {label} (paired): {_ratio(v)}" for label, v in g["paired_ratios"].items()]
    out += ["", "Authentication-Results of the last message each side delivered:", ""]
    for peer, text in chain.get("authentication_results", {}).items():
        out.append(f"- {peer}: `{text or '-'}`")
    return out


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"# mailgate benchmark: {meta['timestamp']}",
        "",
        f"Mode: {'smoke' if meta['smoke'] else 'full'}, {meta['repeats']} repeat(s), "
        f"{meta['elapsed_s']:.0f} s in all. Machine: {meta['cpus']} CPUs, {meta['kernel']}, "
        f"Python {meta['python']}, Postfix {meta.get('postfix', '?')}, "
        f"aiosmtpd {meta.get('aiosmtpd', '?')}. Work dir {meta['work']} "
        f"({meta.get('work_fs', '?')}).",
        "",
        "Ratios compare medians measured in this one run; absolute numbers are context only.",
        "",
        "## Targets",
        "",
        *targets_table(result["targets"]),
    ]
    scenarios = result["scenarios"]
    for key, render in (
        ("A", _scenario_a),
        ("B", _scenario_b),
        ("C", _scenario_c),
        ("D", _scenario_d),
        ("E", _scenario_e),
        ("F", _scenario_f),
        ("G", _scenario_g),
    ):
        if key in scenarios:
            lines += ["", *render(scenarios[key])]
        elif key in result.get("failed", {}):
            lines += ["", f"## {key}: failed", "", "```", result["failed"][key][-1500:], "```"]
    return "\n".join(lines) + "\n"


__all__ = ["evaluate", "markdown", "size_label"]
