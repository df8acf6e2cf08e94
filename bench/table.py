"""The per-event cost table of docs/performance.md from bench/run.py's output:
`python bench/table.py FILE [FILE ...]` (JSON lines, one file per run.py invocation, e.g. one on
MariaDB and one with --database sqlite) prints markdown: every figure as median (min-max) of its
runs, with the load average the runs saw and the issue 17 target beside it.

    python bench/run.py --only dispatch,latency,coldstart,subscribe --rtt-ms 0 --recycle-after 0 > mariadb.jsonl
    python bench/run.py --only dispatch --database sqlite --rtt-ms 0 --recycle-after 0 > sqlite.jsonl
    python bench/table.py mariadb.jsonl sqlite.jsonl

Nothing here judges a figure: the target column is there to read it against.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterable

PROVIDERS = ("apns", "fcm", "webpush")
FUNCTIONS = ("dispatch-apns", "dispatch-fcm", "dispatch-webpush", "subscribe", "unsubscribe",
             "cleanup-invalid-tokens")
DISPATCH_ROWS = (
    # (label, figure name, shape, targets by provider)
    ("CPU per event, 1 user x 1 device (ms)", "dispatch_cpu_per_event", "1x1",
     {"apns": "<= 0.30", "fcm": "<= 0.30", "webpush": "<= 0.45"}),
    ("MariaDB server CPU per event, 1 x 1 (ms; shared server: upper bound)", "database_cpu_per_event", "1x1",
     {}),
    ("CPU per push, 1 user x 3 devices (ms)", "dispatch_cpu_per_push", "1x3",
     {"apns": "<= 0.20", "fcm": "<= 0.20"}),
    ("MariaDB server CPU per event, 1 x 3 (ms; upper bound)", "database_cpu_per_event", "1x3", {}),
    ("CPU per push, 100 users x 3 devices (ms)", "dispatch_cpu_per_push", "100x3", {}),
    ("pushes/s, 1 x 1 (counted at the fake)", "dispatch_pushes_per_second", "1x1", {}),
    ("pushes/s, 1 x 3", "dispatch_pushes_per_second", "1x3", {}),
    ("pushes/s, 100 x 3", "dispatch_pushes_per_second", "100x3", {}),
    ("load generator CPU per event, 1 x 1 (ms; its own process, not counted above)",
     "loadgen_cpu_per_event", "1x1", {}),
    ("event to provider p50 at 500 events/s of 1 x 3 (ms)", "event_latency_p50", "1x3", {}),
    ("event to provider p99 at 500 events/s of 1 x 3 (ms)", "event_latency_p99", "1x3",
     {"apns": "<= 20", "fcm": "<= 20", "webpush": "<= 20"}),
)


def figure(line: dict) -> str:
    """``median (min-max)``, or the value alone when there is no spread."""
    value, spread = line["value"], line["parameters"].get("spread")
    if value is None:
        return "-"
    if not spread or spread["min"] == spread["max"]:
        return _number(value)
    return f"{_number(spread['median'])} ({_number(spread['min'])}-{_number(spread['max'])})"


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}".rstrip("0").rstrip(".") if value < 1 else f"{value:.2f}"


def load_range(lines: Iterable[dict]) -> str:
    values = [x for line in lines for x in (line["parameters"].get("loadavg_1m") or {}).values()]
    return f"{min(values):.1f}-{max(values):.1f}" if values else "-"


def read(paths: list[str]) -> list[dict]:
    lines = []
    for path in paths:
        with open(path) as f:
            lines.extend(json.loads(line) for line in f if line.startswith("{"))
    return lines


def dispatch_table(lines: list[dict], database: str) -> list[str]:
    names = {name for _, name, _, _ in DISPATCH_ROWS}
    mine = [line for line in lines if line["parameters"].get("database") == database
            and line["provider"] in PROVIDERS and line["name"] in names]
    if not mine:
        return []
    providers = [p for p in PROVIDERS if any(line["provider"] == p for line in mine)]
    names = {"apns": "APNs", "fcm": "FCM", "webpush": "Web Push"}
    out = [f"| {database}: median (min-max) of the runs | "
           + " | ".join(names[p] for p in providers) + " | target |",
           "|---|" + "---|" * len(providers) + "---|"]
    used: list[dict] = []
    for label, name, shape, targets in DISPATCH_ROWS:
        cells, found = [], False
        for provider in providers:
            match = [line for line in mine if line["name"] == name and line["provider"] == provider
                     and line["parameters"].get("shape") == shape]
            cells.append(figure(match[-1]) if match else "-")
            found |= bool(match)
            used.extend(match[-1:])
        if found:
            target = " / ".join(f"{names[p]} {targets[p]}" for p in providers if p in targets) or "-"
            out.append(f"| {label} | " + " | ".join(cells) + f" | {target} |")
    refused = [sum(r.get("non_2xx", 0) for r in line["parameters"]["per_run"]) for line in mine
               if line["name"] == "dispatch_pushes_per_second"]
    out.append(f"| answers other than 2xx at the fakes, all runs | {sum(refused)} |"
               + " |" * (len(providers) - 1) + " 0 |")
    out.append(f"| 1-minute load average during these runs | {load_range(used)} |"
               + " |" * (len(providers) - 1) + " - |")
    return out


def start_table(lines: list[dict]) -> list[str]:
    starts = {line["parameters"]["function"]: line for line in lines if line["name"] == "cold_start"}
    memory = {line["parameters"]["function"]: line for line in lines if line["name"] == "idle_memory_pss"}
    if not starts:
        return []
    out = ["| function | cold start to the first request answered, ms | its CPU, ms | idle memory, PSS of "
           "all its processes, MB | load average |", "|---|---|---|---|---|"]
    for function in FUNCTIONS:
        if function not in starts:
            continue
        start, cpu = starts[function], starts[function]["parameters"]["cpu_ms"]
        out.append(f"| {function} | {figure(start)} | {cpu['median']:.0f} ({cpu['min']:.0f}-{cpu['max']:.0f}) | "
                   f"{figure(memory[function]) if function in memory else '-'} | "
                   f"{load_range([start])} |")
    out.append("| target | <= 300 | - | <= 50 | - |")
    return out


def subscribe_table(lines: list[dict]) -> list[str]:
    out = []
    for line in lines:
        if line["name"] == "subscribe_requests_per_second":
            p99 = next(x for x in lines if x["name"] == "subscribe_latency_p99"
                       and x["parameters"]["database"] == line["parameters"]["database"])
            out += ["| subscribe, 16 in flight | requests/s | p99, ms | load average |", "|---|---|---|---|",
                    f"| {line['parameters']['database']} | {figure(line)} | {figure(p99)} | {load_range([line])} |",
                    "| target (MariaDB) | >= 2,000 | <= 15 | - |"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    lines = read(args.files)
    networks = {json.dumps(line["parameters"]["network"], sort_keys=True) for line in lines
                if "network" in line["parameters"]}
    sections = [dispatch_table(lines, "mariadb"), dispatch_table(lines, "sqlite"), start_table(lines),
                subscribe_table(lines)]
    print(f"Fakes' network: {', '.join(sorted(networks)) or '-'}\n")
    print("\n\n".join("\n".join(section) for section in sections if section))


if __name__ == "__main__":
    main()
