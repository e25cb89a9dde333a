"""What a run leaves behind: the terminal table, `latest.json` (every figure, every repetition,
the machine), `latest.png` (the scenarios side by side) and the README's Benchmarks section."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

README_BEGIN = "<!-- bench:begin (written by `ztunnel bench`; edits inside are overwritten) -->"
README_END = "<!-- bench:end -->"


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, int | float):
        return format(v, spec)
    return str(v)


def _x(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _agent_cpu(s: dict[str, Any]) -> str:
    cpu = s.get("cpu", {})
    vals = [c.get("vcpu_per_1k_rps_fixed") for c in cpu.values()]
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    return " / ".join(f"{v:.3f}" for v in vals)


def rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "scenario",
        "bulk 1c Gb/s",
        "bulk 8c Gb/s",
        "req/s max",
        "p50 us",
        "p90 us",
        "p99 us",
        "+p50 us",
        "conn/s",
        "storm conn/s",
        "vCPU/1k req/s",
        "bulk1 vs stunnel",
        "req/s vs stunnel",
        "conn/s vs stunnel",
        "storm vs stunnel",
    ]
    out = []
    for name in results["plan"]["scenarios"]:
        s = results["summary"].get(name)
        if s is None:
            continue
        r = results["ratios"].get(name, {})
        out.append(
            [
                name,
                _fmt(s.get("bulk1_gbps")),
                _fmt(s.get("bulk8_gbps")),
                _fmt(s.get("rr_max_rps"), ",.0f"),
                _fmt(s.get("lat_p50_us"), ".0f"),
                _fmt(s.get("lat_p90_us"), ".0f"),
                _fmt(s.get("lat_p99_us"), ".0f"),
                _fmt(r.get("added_p50_us"), "+.0f"),
                _fmt(s.get("cps"), ",.0f"),
                _fmt(s.get("storm_cps"), ",.0f"),
                _agent_cpu(s),
                _x(r.get("bulk1_gbps_vs_stunnel")),
                _x(r.get("rr_max_rps_vs_stunnel")),
                _x(r.get("cps_vs_stunnel")),
                _x(r.get("storm_cps_vs_stunnel")),
            ]
        )
    return header, out


def text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def memory_lines(results: dict[str, Any]) -> list[str]:
    out = []
    for lab, rss in results.get("idle_rss_bytes", {}).items():
        if rss:
            out.append(
                f"idle RSS ({lab}): " + ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in rss.items())
            )
    for name, m in results.get("memory", {}).items():
        per = m.get("bytes_per_connection", {})
        out.append(
            f"{m.get('connections')} idle connections through {name}: "
            + ", ".join(
                f"{k} +{(m['rss_with_connections'][k] - m['rss_before'][k]) / 2**20:.1f}"
                f" MB ({_fmt(v, ',.0f')} B/conn)"
                for k, v in per.items()
            )
            + f"; total {_fmt(m.get('bytes_per_connection_total'), ',.0f')} B per connection"
        )
    return out


def machine_load_line(results: dict[str, Any]) -> str:
    """How busy the machine was while each scenario ran (medians over its measurements)."""
    parts = [
        f"{name} {_fmt(s.get('machine_busy_vcpu'))}/{_fmt(s.get('machine_steal_vcpu'))}"
        for name, s in results["summary"].items()
    ]
    cores = results["machine"].get("cores", "?")
    return f"machine busy/steal vCPU during the measurements (of {cores}): " + ", ".join(parts)


def capture_lines(results: dict[str, Any]) -> list[str]:
    out = []
    for k, c in results.get("capture_comparison", {}).items():
        out.append(
            f"{k}: bulk1 {_x(c.get('bulk1_ratio'))}, bulk8 {_x(c.get('bulk8_ratio'))}, "
            f"req/s {_x(c.get('rr_max_ratio'))}, conn/s {_x(c.get('cps_ratio'))}, "
            f"p50 {_fmt(c.get('p50_diff_us'), '+.0f')} us"
        )
    return out


def profile_lines(results: dict[str, Any]) -> list[str]:
    """Per profiled load and agent: the measured figure and own time per package."""
    out = []
    for scenario, loads in results.get("profiles", {}).items():
        for entry in loads.values():
            for proc, prof in entry.items():
                if not isinstance(prof, dict) or not prof.get("samples"):
                    continue
                top = ", ".join(
                    f"{p['function']} {100 * p['share']:.0f}%"
                    for p in prof.get("own_by_package", [])[:6]
                )
                out.append(f"{scenario} {entry['figure']} {proc}: {top}")
    return out


def target_lines(results: dict[str, Any]) -> list[str]:
    out = []
    for t in results.get("targets", []):
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        if t["met"] is None and t["goal"] == "-":
            mark = "recorded"
        v = t["value"]
        if isinstance(v, dict):
            v = ", ".join(f"{k} {_fmt(x, '.3g')}" for k, x in v.items())
        elif isinstance(v, float):
            v = f"{v:.3g}"
        out.append(f"{t['target']}: {v} (goal {t['goal']}) -> {mark}")
    return out


def machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    return (
        f"{m['date']}; {m['cpu_model']}, {m['cores']} cores, "
        f"{m['memory_bytes'] / 2**30:.0f} GiB; kernel {m['kernel']}; Python {m['python']}, "
        f"uvloop {m['uvloop']}; {m['openssl']}; {m['stunnel'].split(' on ')[0]}"
    )


def terminal(results: dict[str, Any]) -> str:
    header, body = rows(results)
    p = results["plan"]
    parts = [
        f"machine: {machine_line(results)}",
        f"medians of {p['reps']} runs; bulk {p['bulk_seconds']} s (iperf3), load "
        f"{p['load_seconds']} s; latency at {p['fixed_rate']:.0f} req/s over "
        f"{p['fixed_conns']} connections (1 KiB request / 1 KiB response); "
        f"+p50 = added to direct; vCPU/1k req/s per agent (src / dst) or stunnel process",
        "",
        text_table(header, body),
        "",
        machine_load_line(results),
        *capture_lines(results),
        *memory_lines(results),
        "",
        "targets:",
        *("  " + t for t in target_lines(results)),
    ]
    if results.get("profiles"):
        parts += [
            "",
            "profiles (py-spy, own time by package):",
            *("  " + line for line in profile_lines(results)),
        ]
    if results.get("recoveries"):
        parts += ["", f"labs rebuilt after a failed measurement: {len(results['recoveries'])}"]
    if results.get("errors"):
        parts += ["", "errors:", *("  " + e for e in results["errors"])]
    return "\n".join(parts)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def chart(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: one panel per figure, one bar per scenario (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results["plan"]["scenarios"] if n in results["summary"]]
    summary = results["summary"]
    panels = [
        ("bulk1_gbps", "bulk, 1 connection (Gbit/s)"),
        ("bulk8_gbps", "bulk, 8 connections (Gbit/s)"),
        ("rr_max_rps", "requests/s, max (persistent)"),
        ("cps", "new connections/s"),
        ("storm_cps", "connection storm: new connections/s"),
        ("lat_p50_us", f"p50 latency at {results['plan']['fixed_rate']:.0f} req/s (us)"),
        ("lat_p99_us", f"p99 latency at {results['plan']['fixed_rate']:.0f} req/s (us)"),
        ("storm_p99_us", "connection storm: p99 (us)"),
    ]
    colours = {"direct": "#4c72b0", "stunnel": "#dd8452", "mesh": "#55a868"}
    fig, axes = plt.subplots(2, 4, figsize=(19, 8))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        vals = [summary[n].get(key) or 0.0 for n in names]
        cols = [colours.get(results["scenarios"][n]["via"], "#888888") for n in names]
        bars = ax.bar(range(len(names)), vals, color=cols)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        for b, v in zip(bars, vals, strict=True):
            ax.annotate(
                f"{v:,.2f}" if v < 100 else f"{v:,.0f}",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    fig.suptitle(
        f"ztunnel-py data path vs direct TCP and stunnel - {machine_line(results)}", fontsize=8
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def readme_section(results: dict[str, Any]) -> str:
    header, body = rows(results)
    p = results["plan"]
    return "\n".join(
        [
            README_BEGIN,
            f"Latest full run: {machine_line(results)}.",
            "",
            f"Medians of {p['reps']} interleaved runs; bulk = iperf3 {p['bulk_seconds']} s; "
            f"requests = our C generator (`bench/loadgen.c`), 1 KiB request / 1 KiB response, "
            f"max over {p['rr_conns']} persistent connections and latency at a fixed "
            f"{p['fixed_rate']:.0f} req/s; conn/s = connect, one request, close "
            f"({p['cps_conns']} at a time); storm = the same with {p.get('storm_conns', '-')} "
            "at a time (a connection storm); +p50 = latency added to direct; vCPU/1k req/s = "
            "CPU of each agent (source / destination, with its worker processes) or stunnel "
            "process at the fixed rate. mesh-workers = the agents with one worker process per "
            "usable CPU (`--workers`, the default of `ztunnel run`); the other mesh rows run "
            "one process per agent.",
            "",
            markdown_table(header, body),
            "",
            *(
                "- " + line
                for line in [
                    machine_load_line(results),
                    *capture_lines(results),
                    *memory_lines(results),
                ]
            ),
            "",
            "Targets:",
            "",
            *("- " + t for t in target_lines(results)),
            *(
                [
                    "",
                    f"Failed measurements (recorded in the JSON): {len(results['errors'])}; "
                    + "; ".join(results["errors"][:4])
                    + (" ..." if len(results["errors"]) > 4 else ""),
                ]
                if results.get("errors")
                else []
            ),
            *(
                [
                    "",
                    "Agent profiles (py-spy, own time by package):",
                    "",
                    *("- " + line for line in profile_lines(results)),
                ]
                if results.get("profiles")
                else []
            ),
            README_END,
        ]
    )


def update_readme(readme: Path, section: str) -> None:
    """Replaces the Benchmarks block between the markers (appends the section if missing)."""
    text = readme.read_text()
    if README_BEGIN in text and README_END in text:
        pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
        text = pattern.sub(lambda _m: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n## Benchmarks\n\n" + BENCH_INTRO + "\n\n" + section + "\n"
    readme.write_text(text)


BENCH_INTRO = """\
`sudo bench/run.sh` (or `sudo .venv/bin/python -m ztunnel bench`) measures, in one run and in
the namespace lab, the same pod-to-pod traffic four ways: **direct** (pods not enrolled, no
mesh: the machine's limit), **stunnel** (a Debian `stunnel4` pair on the two nodes, mutual TLS
1.3 with our CA's certificates: the classic C TLS tunnel), **mesh** (our agents, eBPF capture +
HBONE, cross node and same node) and **tproxy** (the same agents with nftables TPROXY capture
instead of eBPF). About 7 minutes; `--quick` is a smoke run under a minute. It prints the
table, writes `bench/results/latest.json` (every figure, every repetition, the machine) and
`bench/results/latest.png`, and rewrites the block below. `--profile` adds py-spy profiles of
the agents under bulk and new-connection load (needs `pip install py-spy` in the venv).
**mesh-workers** runs the agents with one worker process per usable CPU (the default of
`ztunnel run`; the other mesh rows pin `--workers 1`), and every scenario also takes a
**connection storm** (many short connections at once)."""
