"""The one Dockerfile builds each function's image with only what that function needs.

Docker cannot run here, so the image is checked by reading: the Dockerfile's structure, and the
dependency set each function's image installs (requirements/<function>.txt, resolved through its
-r includes and then through the installed packages' own requirements). That set must leave out
the other providers' libraries, and must be enough to import the function: a subprocess that
sees only those packages (and the shared package) imports everything the function's main.py
imports, plus what functions-framework's ASGI server and `pushctl migrate` load.
"""
from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path, PurePath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from shared.metrics import DEFAULT_PORT as DEFAULT_METRICS_PORT

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
REQUIREMENTS = REPO / "requirements"
FUNCTIONS = sorted(p.name for p in (REPO / "functions").iterdir() if (p / "main.py").exists())

#: Libraries a function's image must not carry (canonical distribution names).
PROVIDER_LIBRARIES = {
    "fcm": {"google-auth", "firebase-admin"},
    "apns": set(),  # APNs needs nothing the others do not (shared/transport, PyJWT)
    "webpush": {"py-vapid", "http-ece"},
}
NOT_IN_IMAGE = {
    "subscribe": PROVIDER_LIBRARIES["fcm"] | PROVIDER_LIBRARIES["apns"] | PROVIDER_LIBRARIES["webpush"],
    "unsubscribe": PROVIDER_LIBRARIES["fcm"] | PROVIDER_LIBRARIES["apns"] | PROVIDER_LIBRARIES["webpush"],
    "cleanup-invalid-tokens": PROVIDER_LIBRARIES["fcm"] | PROVIDER_LIBRARIES["apns"]
    | PROVIDER_LIBRARIES["webpush"] | {"httpx"},
    "dispatch-fcm": PROVIDER_LIBRARIES["apns"] | PROVIDER_LIBRARIES["webpush"] | {"firebase-admin"},
    "dispatch-apns": PROVIDER_LIBRARIES["fcm"] | PROVIDER_LIBRARIES["webpush"] | {"requests"},
    "dispatch-webpush": PROVIDER_LIBRARIES["fcm"] | PROVIDER_LIBRARIES["apns"],
}
#: Imported at run time though not by main.py's imports: the server the image's command starts
#: (gunicorn's command line, its settings module and uvicorn's worker, functions-framework's ASGI
#: app), the MySQL driver SQLAlchemy loads on the first connection, and `pushctl migrate`.
RUNTIME_MODULES = [
    "gunicorn.app.wsgiapp",
    "functions_framework.aio",
    "shared.gunicorn_config",
    "pymysql",
    "shared.cli",
    "alembic.command",
]


# --- the Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = current.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            current = ""
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def test_the_base_image_is_python_3_11_slim(instructions):
    args = dict(rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest)
    bases = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), base)
        assert resolved == "python:3.11-slim"


def test_the_function_is_a_build_argument(instructions):
    for stage in stages(instructions):
        assert ("ARG", "FUNCTION") in stage, "every stage must declare ARG FUNCTION to use it"


def test_the_image_installs_only_the_functions_requirement_file(instructions):
    pip_installs = [rest for keyword, rest in instructions if keyword == "RUN" and "pip install" in rest]
    requirement_installs = [r for r in pip_installs if "--requirement" in r or " -r " in r]
    assert len(requirement_installs) == 1
    assert '/src/requirements/${FUNCTION}.txt' in requirement_installs[0]
    assert any("--no-deps /src" in r for r in pip_installs), "the shared package, without resolving"


def test_the_runtime_stage_copies_only_the_functions_folder(instructions):
    runtime = stages(instructions)[-1]
    copies = [rest for keyword, rest in runtime if keyword == "COPY"]
    sources = [c.split()[-2] for c in copies]
    assert "functions/${FUNCTION}/" in sources
    assert not any(s.rstrip("/") in ("functions", ".", "shared", "tests") for s in sources), sources
    assert any(c.startswith("--from=build /opt/venv") for c in copies)


def test_the_image_runs_as_a_non_root_user(instructions):
    users = [rest for keyword, rest in stages(instructions)[-1] if keyword == "USER"]
    assert users, "no USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid, so runAsNonRoot can check it"


def image_command(instructions: list[tuple[str, str]]) -> str:
    commands = [rest for keyword, rest in instructions if keyword == "CMD"]
    assert len(commands) == 1
    return commands[0]


def test_the_command_serves_the_functions_asgi_app_with_gunicorn_as_functions_framework_does(instructions):
    command = image_command(instructions)
    assert command.startswith("exec gunicorn "), "exec: gunicorn is PID 1 and gets SIGTERM itself"
    assert "--config python:shared.gunicorn_config" in command, "the settings module with the fork hooks"
    assert "--worker-class shared.gunicorn_config.UvicornWorker" in command, "uvicorn's worker"
    assert "--preload" in command, "the app is loaded before the fork, as functions-framework does"
    assert '--bind "0.0.0.0:${PORT:-8080}"' in command
    assert (
        "\"functions_framework.aio:create_asgi_app(target='$(echo \"${FUNCTION}\" | tr - _)', "
        "source='/app/functions/${FUNCTION}/main.py')\"" in command
    )
    envs = " ".join(rest for keyword, rest in stages(instructions)[-1] if keyword == "ENV")
    assert "PORT=8080" in envs


def test_the_command_leaves_the_graceful_timeout_to_gunicorn_cmd_args(instructions):
    """gunicorn's command-line options win over GUNICORN_CMD_ARGS, where the manifests set it."""
    assert "--graceful-timeout" not in image_command(instructions)


def test_the_image_exposes_the_function_port_and_the_default_metrics_port(instructions):
    exposed = {port for keyword, rest in instructions if keyword == "EXPOSE" for port in rest.split()}
    assert exposed == {"8080", str(DEFAULT_METRICS_PORT)}


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "start from nothing and list what an image may use"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {"Dockerfile", "pyproject.toml", "requirements", "shared", "functions"}


# --- requirement files ----------------------------------------------------------------------


def requirement_lines(path: Path, seen: set[Path] | None = None) -> list[Requirement]:
    """The requirements of a pip requirements file, following its -r includes."""
    seen = set() if seen is None else seen
    if path in seen:
        return []
    seen.add(path)
    result = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            result += requirement_lines((path.parent / line.split(None, 1)[1]).resolve(), seen)
            continue
        assert not line.startswith("-"), f"{path}: unexpected option {line!r}"
        result.append(Requirement(line))
    return result


def resolve(requirements: list[Requirement]) -> dict[str, metadata.Distribution]:
    """Every installed distribution these requirements bring in, by canonical name."""
    found: dict[str, metadata.Distribution] = {}
    extras_done: dict[str, set[str]] = {}
    queue = [(req, set(req.extras)) for req in requirements]
    while queue:
        requirement, extras = queue.pop()
        name = canonicalize_name(requirement.name)
        done = extras_done.setdefault(name, set())
        if name in found and extras <= done:
            continue
        done |= extras
        dist = metadata.distribution(requirement.name)
        found[name] = dist
        for spec in dist.requires or []:
            child = Requirement(spec)
            contexts = [{"extra": e} for e in extras | {""}]
            if child.marker is None or any(child.marker.evaluate(c) for c in contexts):
                queue.append((child, set(child.extras)))
    return found


def function_requirements(function: str) -> list[Requirement]:
    path = REQUIREMENTS / f"{function}.txt"
    assert path.exists(), f"the Dockerfile installs requirements/{function}.txt for {function}"
    return requirement_lines(path)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_each_function_has_its_requirement_file(function):
    assert function_requirements(function)


def test_requirements_txt_includes_every_functions_file():
    included = {
        line.split(None, 1)[1] for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.startswith("-r ")
    }
    assert included == {f"requirements/{function}.txt" for function in FUNCTIONS}


def test_every_requirement_is_pinned_once_at_the_installed_version():
    pins: dict[str, str] = {}
    for path in sorted(REQUIREMENTS.glob("*.txt")):
        for requirement in requirement_lines(path):
            specs = list(requirement.specifier)
            assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}: {requirement} is not pinned"
            name = canonicalize_name(requirement.name)
            assert pins.setdefault(name, specs[0].version) == specs[0].version, f"{name} pinned twice"
            assert metadata.version(requirement.name) == specs[0].version, (
                f"{name}: {specs[0].version} pinned, {metadata.version(requirement.name)} installed and tested"
            )


@pytest.mark.parametrize("function", FUNCTIONS)
def test_the_image_leaves_out_other_providers_libraries(function):
    installed = set(resolve(function_requirements(function)))
    assert not installed & NOT_IN_IMAGE[function], sorted(installed & NOT_IN_IMAGE[function])


def test_the_dependency_check_sees_transitive_dependencies():
    """The check above can fail: Flask comes into every image through functions-framework."""
    installed = resolve(function_requirements("dispatch-webpush"))
    assert "flask" in installed and "flask" not in {
        canonicalize_name(r.name) for r in function_requirements("dispatch-webpush")
    }


# --- each image's packages are enough to run its function --------------------------------------


def main_imports(function: str) -> list[str]:
    tree = ast.parse((REPO / "functions" / function / "main.py").read_text())
    modules = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.append(node.module)
    return modules


def link_distribution(dist: metadata.Distribution, target: Path) -> None:
    """Make ``dist``'s installed files visible under ``target``: a whole regular package or module
    is linked at once; a namespace package (``google``) is recreated so only this
    distribution's part of it shows."""
    base = Path(str(dist.locate_file("")))
    for file in dist.files or []:
        parts = PurePath(file).parts
        if not parts or parts[0] == ".." or parts[0] == "__pycache__":
            continue
        source, destination = base, target
        for index, part in enumerate(parts):
            source, destination = source / part, destination / part
            last = index == len(parts) - 1
            if last or not source.is_dir() or (source / "__init__.py").exists() or "." in part:
                if not destination.exists() and not destination.is_symlink():
                    destination.symlink_to(source)
                break
            if destination.is_symlink():
                break
            destination.mkdir(exist_ok=True)


def import_with_only(function: str, packages: Path, modules: list[str]) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import importlib, sys
        sys.path[:0] = [{str(packages)!r}, {str(REPO)!r}]
        for name in {modules!r}:
            importlib.import_module(name)
        leaked = [m.__name__ for m in list(sys.modules.values())
                  if getattr(m, "__file__", None) and "site-packages" in m.__file__
                  and not m.__file__.startswith({str(packages)!r})]
        assert not leaked, leaked
        """
    )
    return subprocess.run(
        [sys.executable, "-S", "-I", "-c", code], check=False, capture_output=True, text=True, timeout=120,
        cwd=packages,
    )


@pytest.mark.parametrize("function", FUNCTIONS)
def test_the_images_packages_are_enough_to_import_the_function(function, tmp_path):
    for dist in resolve(function_requirements(function)).values():
        link_distribution(dist, tmp_path)
    result = import_with_only(function, tmp_path, main_imports(function) + RUNTIME_MODULES)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_import_check_fails_without_a_needed_package(tmp_path):
    """The check above can fail: dispatch-apns without h2 cannot import its provider."""
    for name, dist in resolve(function_requirements("dispatch-apns")).items():
        if name != "h2":
            link_distribution(dist, tmp_path)
    result = import_with_only("dispatch-apns", tmp_path, main_imports("dispatch-apns"))
    assert result.returncode != 0
    assert "'h2'" in result.stderr


# --- the image's command, run --------------------------------------------------------------------


PROBE_FUNCTION = """
import asyncio
import gc

import functions_framework.aio
from starlette.responses import JSONResponse, Response


@functions_framework.aio.http
async def probe(request):
    if "seconds" in request.query_params:
        await asyncio.sleep(float(request.query_params["seconds"]))
        return Response(status_code=202)
    return JSONResponse({"collecting": gc.isenabled(), "frozen": gc.get_freeze_count()})
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def image_serving(instructions, tmp_path: Path, gunicorn_cmd_args: str = "") -> Iterator[tuple[subprocess.Popen, int]]:
    """The image's command, run as the image's shell would, on a function under ``tmp_path``
    (PROBE_FUNCTION); its process and port once it accepts connections."""
    (tmp_path / "functions" / "probe").mkdir(parents=True)
    (tmp_path / "functions" / "probe" / "main.py").write_text(PROBE_FUNCTION)
    command = image_command(instructions).replace("/app/functions/", f"{tmp_path}/functions/")
    port = free_port()
    environment = {
        **os.environ, "FUNCTION": "probe", "PORT": str(port), "GUNICORN_CMD_ARGS": gunicorn_cmd_args,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    environment.pop("WORKERS", None)
    server = subprocess.Popen(["sh", "-c", command], env=environment, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        yield server, port
    finally:
        if server.poll() is None:
            server.terminate()  # gunicorn stops its worker too (SIGKILL would leave it behind)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def stopped_mid_request(instructions, tmp_path: Path, gunicorn_cmd_args: str, seconds: float) -> int | None:
    """Run the image's command on a function that answers 202 after ``seconds``, send it SIGTERM
    half a second into a request, and return that request's status, or None when the server cut
    it off."""
    with image_serving(instructions, tmp_path, gunicorn_cmd_args) as (server, port):
        result: dict[str, int | None] = {}

        def request() -> None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/?seconds={seconds}", timeout=30) as answer:
                    result["status"] = answer.status
            except (urllib.error.URLError, ConnectionError, OSError):
                result["status"] = None

        client = threading.Thread(target=request)
        client.start()
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        client.join(timeout=40)
        server.wait(timeout=40)
        return result["status"]


def test_on_sigterm_the_image_finishes_requests_for_the_graceful_timeout(instructions, tmp_path):
    assert stopped_mid_request(instructions, tmp_path, "--graceful-timeout 10", seconds=2) == 202


def test_on_sigterm_the_image_cuts_off_requests_past_the_graceful_timeout(instructions, tmp_path):
    """The check above can fail: with a 1 s drain, a 3 s request is cut off."""
    assert stopped_mid_request(instructions, tmp_path, "--graceful-timeout 1", seconds=3) is None


def test_the_worker_collects_garbage_but_not_among_what_the_master_imported(instructions, tmp_path):
    """The master imports the function with the collector off and freezes what it built before
    the fork (shared/gunicorn_config.py): the worker collects its own garbage, never the
    thousands of objects it shares with the master."""
    with image_serving(instructions, tmp_path) as (_server, port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as answer:
            state = json.load(answer)
    assert state["collecting"] is True
    assert state["frozen"] > 10_000


def test_a_websocket_upgrade_request_is_answered_as_plain_http(instructions, tmp_path):
    """The worker has no WebSocket support (no function serves WebSockets)."""
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    with image_serving(instructions, tmp_path) as (_server, port):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers=upgrade)
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
            assert "collecting" in json.load(answer)
