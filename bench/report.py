"""The benchmark's report: each goal judged against the reference measured in the same run,
and the table `python -m bench` prints (`bench/__main__.py` measures)."""

from __future__ import annotations

from typing import Any


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance goals (issue 14, and spend control's cost from issue 10), each
    judged against figures measured in this run."""
    c1, c64, s = r["c1"], r["c64"], r["streams"]
    first_added = {
        n: s[f"{n}_first_p50_ms"] - s["direct_first_p50_ms"] for n in ("reference", "proxy")
    }

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("inf")

    rows = [
        (
            "CPU per request, c=64, vs reference",
            ratio(c64["proxy_cpu_ms_per_request"], c64["reference_cpu_ms_per_request"]),
            "x",
            1.3,
        ),
        (
            "added latency c=1 p50, vs reference",
            ratio(c1["proxy_added_p50_ms"], c1["reference_added_p50_ms"]),
            "x",
            1.5,
        ),
        (
            f"{s['count']} streams: added first chunk p50, minus reference's",
            first_added["proxy"] - first_added["reference"],
            "ms",
            5.0,
        ),
        (
            f"{s['count']} streams: CPU per stream, vs reference",
            ratio(s["proxy_cpu_ms_per_stream"], s["reference_cpu_ms_per_stream"]),
            "x",
            1.1,
        ),
        ("peak RSS of the serving process", r["proxy_peak_rss_mb"], "MB", 80.0),
        ("start-up: serve to /healthz answering (restart)", r["startup_s"], "s", 1.5),
        ("streams byte-correct", float(s["count"] - s["proxy_correct"]), "wrong", 0.0),
        (
            f"spend control's CPU per request, vs without (median of {r['spend']['pairs']} pairs)",
            r["spend"]["ratio"],
            "x",
            1.15,
        ),
    ]
    return [
        {"goal": name, "measured": value, "unit": unit, "limit": limit, "pass": value <= limit}
        for name, value, unit, limit in rows
    ]


def table(r: dict[str, Any]) -> str:
    """The figures (direct, the reference, byok-proxy) and then the goals, PASS or FAIL."""
    c1, c64, s, sc = r["c1"], r["c64"], r["streams"], r["scale"]
    rows: list[tuple[str, Any, Any, Any]] = [
        ("latency c=1 p50 (ms)", c1["direct_p50_ms"], c1["reference_p50_ms"], c1["proxy_p50_ms"]),
        ("latency c=1 p99 (ms)", c1["direct_p99_ms"], c1["reference_p99_ms"], c1["proxy_p99_ms"]),
        (
            "added latency c=1 p50 (ms)",
            None,
            c1["reference_added_p50_ms"],
            c1["proxy_added_p50_ms"],
        ),
        ("requests/s c=64", c64["direct_rps"], c64["reference_rps"], c64["proxy_rps"]),
        ("  in rounds of their own: 1 worker", None, None, c64["one_worker_rps"]),
        (
            f"  and --workers auto ({c64['workers_auto']})",
            None,
            None,
            c64["workers_auto_rps"],
        ),
        (
            "CPU ms/request c=64",
            None,
            c64["reference_cpu_ms_per_request"],
            c64["proxy_cpu_ms_per_request"],
        ),
        (
            "  in back-to-back pairs: with spend control",
            None,
            None,
            r["spend"]["policed_cpu_ms_per_request"],
        ),
        (
            "  and without (no budget/limit/allow-list)",
            None,
            None,
            r["spend"]["plain_cpu_ms_per_request"],
        ),
        (
            f"{s['count']} streams: first chunk p50 (ms)",
            s["direct_first_p50_ms"],
            s["reference_first_p50_ms"],
            s["proxy_first_p50_ms"],
        ),
        (
            f"{s['count']} streams: first chunk p99 (ms)",
            s["direct_first_p99_ms"],
            s["reference_first_p99_ms"],
            s["proxy_first_p99_ms"],
        ),
        (
            "CPU ms/stream",
            None,
            s["reference_cpu_ms_per_stream"],
            s["proxy_cpu_ms_per_stream"],
        ),
        (
            "streams byte-correct",
            f"{s['direct_correct']}/{s['count']}",
            f"{s['reference_correct']}/{s['count']}",
            f"{s['proxy_correct']}/{s['count']}",
        ),
        ("peak RSS (MB)", None, r["reference_peak_rss_mb"], r["proxy_peak_rss_mb"]),
        ("start-up to /healthz, restart (s)", None, None, r["startup_s"]),
        ("start-up to /healthz, empty database (s)", None, None, r["first_start_s"]),
        (f"scale: {sc['streams']} slow streams, errors", None, None, sc["errors"]),
        ("scale: peak RSS (MB)", None, None, sc["peak_rss_mb"]),
    ]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = _columns(("metric", "direct", "reference", "byok-proxy"), rows, cell)
    goal_rows = [
        (
            g["goal"],
            f"{g['measured']:.2f} {g['unit']}",
            f"<= {g['limit']:g} {g['unit']}",
            "PASS" if g["pass"] else "FAIL",
        )
        for g in r["goals"]
    ]
    lines += ["", *_columns(("goal", "measured", "target", ""), goal_rows, str)]
    return "\n".join(lines)


def _columns(header: tuple[str, ...], rows: list[tuple[Any, ...]], cell: Any) -> list[str]:
    body = [(row[0], *(cell(c) for c in row[1:])) for row in rows]
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
