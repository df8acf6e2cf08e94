"""Run the whole function set on this machine: `make run`.

Each function runs in its own functions-framework process (ASGI mode), as it is deployed, on SQLite
in `.local/`. Stop them all with Ctrl-C.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / ".local"
BIN = Path(sys.executable).parent

#: Function name -> local port. Fixed, so the README's curl lines work.
PORTS = {
    "subscribe": 8081,
    "unsubscribe": 8082,
    "dispatch-fcm": 8083,
    "dispatch-apns": 8084,
    "dispatch-webpush": 8085,
    "cleanup-invalid-tokens": 8086,
}


def local_environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment.setdefault("PUSH_DATABASE_URL", f"sqlite:///{LOCAL / 'push.sqlite3'}")
    environment.setdefault("PUSH_AUTH_PUBLIC_KEY", str(LOCAL / "auth-public.pem"))
    return environment


def main() -> int:
    LOCAL.mkdir(exist_ok=True)
    environment = local_environment()
    subprocess.run([BIN / "pushctl", "dev-keys", str(LOCAL)], check=True, env=environment)
    subprocess.run([BIN / "pushctl", "migrate"], check=True, env=environment)
    processes: dict[str, subprocess.Popen] = {}
    for name, port in PORTS.items():
        source = REPO / "functions" / name / "main.py"
        if not source.exists():
            continue
        processes[name] = subprocess.Popen(
            [BIN / "functions-framework", "--asgi", "--target", name.replace("-", "_"),
             "--source", str(source), "--host", "127.0.0.1", "--port", str(port)],
            env=environment,
        )
        print(f"{name:24} http://127.0.0.1:{port}/")
    print("\nA token for user 1:  .venv/bin/pushctl dev-token --user 1\nCtrl-C stops everything.")
    try:
        while all(process.poll() is None for process in processes.values()):
            time.sleep(0.5)
        failed = [name for name, process in processes.items() if process.poll() is not None]
        print(f"stopped: {', '.join(failed)} exited", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            process.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
