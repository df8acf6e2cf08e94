"""The Echo import at scale: `python bench/echo_import.py [--rows N] [--runs N] [--batch N]`.

Fills Echo's three tables (tests/echo.py: Echo's column types, realistic tokens, topics and
users) with N rows in a MariaDB database of their own (`push_bench_echo`, kept between runs and
filled again only when its row count differs), then, per run, migrates a fresh target database
(`push_bench_echo_target`) and runs `pushctl import-echo --from ...` as a process of its own,
as an operator would, followed by a second run over the same rows (everything unchanged). Prints
one JSON line per figure on stdout (rows/s, peak RSS of the pushctl process), progress on stderr.
Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, text  # noqa: E402

from tests.echo import create_tables, fill, realistic_rows  # noqa: E402

SERVER = os.environ.get("PUSH_BENCH_MARIADB", "mysql+pymysql://root@127.0.0.1:3306")
SOURCE_DB = "push_bench_echo"
TARGET_DB = "push_bench_echo_target"


def log(message: str) -> None:
    print(f"[echo-import] {message}", file=sys.stderr, flush=True)


def emit(name: str, values: list[float], unit: str, **parameters) -> None:
    """A figure: the median of the runs, with each run and the spread (max - min)."""
    figure = {
        "name": name, "value": round(statistics.median(values), 1), "unit": unit,
        "runs": [round(v, 1) for v in values], "spread": round(max(values) - min(values), 1),
        "parameters": parameters,
    }
    print(json.dumps(figure), flush=True)


def prepare_source(rows: int) -> str:
    """Echo's tables with ``rows`` rows; the URL of their database."""
    server = create_engine(SERVER)
    with server.begin() as connection:
        connection.execute(text(f"CREATE DATABASE IF NOT EXISTS `{SOURCE_DB}`"))
    server.dispose()
    url = f"{SERVER}/{SOURCE_DB}"
    engine = create_engine(url)
    with engine.connect() as connection:
        try:
            held = connection.execute(text("SELECT COUNT(*) FROM echo_push_subscription")).scalar()
        except Exception:  # noqa: BLE001 - no table yet
            held = None
    if held != rows:
        log(f"filling Echo's tables with {rows} rows")
        started = time.monotonic()
        create_tables(engine)
        fill(engine, realistic_rows(rows))
        log(f"filled in {time.monotonic() - started:.0f} s")
    engine.dispose()
    return url


def fresh_target() -> str:
    server = create_engine(SERVER)
    with server.begin() as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS `{TARGET_DB}`"))
        connection.execute(text(f"CREATE DATABASE `{TARGET_DB}` CHARACTER SET utf8mb4"))
    server.dispose()
    url = f"{SERVER}/{TARGET_DB}?charset=utf8mb4"
    pushctl(url, ["migrate"])
    return url


def pushctl(target: str, arguments: list[str]) -> tuple[float, float, float, str]:
    """Run pushctl in a process of its own: wall seconds, its CPU seconds (user + system), its
    peak RSS in MB (the kernel's ru_maxrss of that process alone, from wait4), and the last line
    it printed."""
    env = {**os.environ, "PUSH_DATABASE_URL": target}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "shared.cli", *arguments], cwd=REPO, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"pushctl {arguments[0]} failed:\n{err.read()}")
        last = (out.read().strip().splitlines() or [""])[-1]
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    source = prepare_source(args.rows)
    figures: dict[str, list[float]] = {}
    for run in range(1, args.runs + 1):
        target = fresh_target()
        command = ["import-echo", "--from", source, "--batch", str(args.batch)]
        for name in ("echo_import", "echo_import_again"):
            seconds, cpu, rss, summary = pushctl(target, command)
            log(f"run {run} {name}: {seconds:.1f} s, {cpu:.1f} s CPU, peak RSS {rss:.0f} MB: {summary}")
            figures.setdefault(f"{name}_rows_per_second", []).append(args.rows / seconds)
            figures.setdefault(f"{name}_cpu_ms_per_1000_rows", []).append(1000 * cpu / args.rows * 1000)
            figures.setdefault(f"{name}_peak_rss", []).append(rss)
    units = {"rows_per_second": "rows/s", "cpu_ms_per_1000_rows": "ms", "peak_rss": "MB"}
    for name, values in figures.items():
        unit = next(unit for suffix, unit in units.items() if name.endswith(suffix))
        target = "MariaDB, holding every row already" if "again" in name else "MariaDB, empty"
        emit(name, values, unit, rows=args.rows, batch=args.batch, target=target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
