"""The layers of ``shared/``, and the rule between them: a module imports its own layer and those
below it, never one above. So the types every layer shares live at the bottom (``shared.core``),
a store never imports a provider or the dispatcher to learn what a device is, and a provider
reaches the database only through what its function hands it (the APNs token store).

Lowest first:

core
    the shared types and names (``shared.core``), reading the environment (``shared.config``) and
    what each setting is (``shared.settings``), small helpers that know nothing of ours.
support
    what is read from the settings and used everywhere: the apps and their keys, the Web Push
    endpoint rules, logs and metrics.
db
    the engine and the table models.
storage
    one store per table (subscriptions, deliveries, pending wake-ups, holds, limits, tokens,
    dead letters).
transport
    our HTTP/1.1 and HTTP/2 clients.
providers
    the push providers, which speak to the vendors through the transport.
app
    what the functions serve: HTTP and events, the dispatcher, subscribe, clean-up, ``pushctl``.
functions
    ``functions/*/main.py``, which only wire the app's parts together.

Besides the order, a provider imports no storage and no database module: what it needs of them
(the shared APNs provider token) it is given, as a protocol it declares.

Every module of ``shared/`` must be placed in a layer here: a new one is placed when it is made.
Imports under ``if TYPE_CHECKING:`` and inside functions count like the others.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("core", frozenset({
        "shared", "shared.core", "shared.config", "shared.settings", "shared.localenv", "shared.progress",
        "shared.batching",
    })),
    ("support", frozenset({
        "shared.apps", "shared.endpoints", "shared.vapid", "shared.logs", "shared.metrics",
    })),
    ("db", frozenset({"shared.db", "shared.models", "shared.migrations"})),
    ("storage", frozenset({
        "shared.subscriptions", "shared.deliveries", "shared.pending", "shared.holds", "shared.ratelimits",
        "shared.apns_tokens", "shared.dead_letters", "shared.recorder",
    })),
    ("transport", frozenset({"shared.transport"})),
    ("providers", frozenset({"shared.providers"})),
    ("app", frozenset({
        "shared.http", "shared.http_protocol", "shared.gunicorn_config", "shared.cors", "shared.auth",
        "shared.events", "shared.connectors", "shared.validation", "shared.subscription_api",
        "shared.dispatch", "shared.hold_gate", "shared.cleanup", "shared.echo_import", "shared.sendtest",
        "shared.cli",
    })),
    ("functions", frozenset({"functions"})),
)
"""Each layer's modules, lowest first; a package stands for every module in it."""

KEPT_APART = {("providers", "storage"), ("providers", "db")}
"""(importer, imported) pairs the order alone would allow, forbidden all the same."""

RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str | None:
    """The layer of ``module``: that of the longest listed name it is, or is inside of (the
    ``shared`` package itself stands for its ``__init__`` only)."""
    best: tuple[int, str] | None = None
    for name, members in LAYERS:
        for member in members:
            inside = module.startswith(member + ".") and member != "shared"
            if (module == member or inside) and (best is None or len(member) > best[0]):
                best = (len(member), name)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "functions":
        return "functions." + parts[1]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    paths = [*(REPO / "shared").rglob("*.py"), *(REPO / "functions").glob("*/main.py")]
    return {module_name(path): path for path in sorted(paths)}


def imports_of(source: str, known: set[str]) -> set[str]:
    """The modules of ours that ``source`` imports, anywhere in it. ``from shared import x``
    imports the module ``shared.x`` when there is one."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in known)
    return {name for name in found if name.split(".")[0] in ("shared", "functions")}


def wrong_imports(modules: dict[str, str]) -> list[str]:
    """Each import in ``modules`` (name -> source) that breaks the rule, said in words."""
    wrong = []
    for importer, source in modules.items():
        here = layer_of(importer)
        for imported in sorted(imports_of(source, set(modules))):
            there = layer_of(imported)
            if here is None or there is None:
                continue  # test_every_module_has_a_layer names it
            if RANK[there] > RANK[here]:
                wrong.append(f"{importer} ({here}) imports {imported} ({there}), a higher layer")
            elif (here, there) in KEPT_APART:
                wrong.append(f"{importer} ({here}) imports {imported} ({there}): kept apart")
    return wrong


def test_every_module_has_a_layer() -> None:
    assert [name for name in our_modules() if layer_of(name) is None] == []


def test_no_module_imports_a_higher_layer_nor_one_kept_apart() -> None:
    sources = {name: path.read_text() for name, path in our_modules().items()}
    assert wrong_imports(sources) == []


def test_an_upward_import_is_found_even_inside_a_function_or_type_checking() -> None:
    sources = {
        "shared.subscriptions": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                "    from shared.providers.base import Provider\n",
        "shared.providers.base": "",
        "shared.metrics": "def collect():\n    from shared import holds\n",
        "shared.holds": "",
        "shared.providers.apns": "import shared.apns_tokens\n",
        "shared.apns_tokens": "from shared.core import utcnow\n",
        "shared.core": "",
    }
    assert wrong_imports(sources) == [
        "shared.subscriptions (storage) imports shared.providers.base (providers), a higher layer",
        "shared.metrics (support) imports shared.holds (storage), a higher layer",
        "shared.providers.apns (providers) imports shared.apns_tokens (storage): kept apart",
    ]
