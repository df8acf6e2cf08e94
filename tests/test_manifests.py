"""The deployment manifests (knative/, openfaas/, stack.yml), checked without a cluster.

Every document validates against the reference JSON Schemas in tests/manifest_schemas (public
data from Kubernetes' OpenAPI, the Knative CRDs and OpenFaaS's stack format; its README names
their source and version), chosen by its apiVersion and kind; stack.yml against
openfaas/stack_v1.json; and every combination of knative/'s components, built with
`kubectl kustomize`, validates too. Then the rules no schema checks, one test each, each with a
companion test showing its checker catches a bad document.
"""
from __future__ import annotations

import ast
import copy
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from shared.events import FLUSH_TICK, NOTIFICATION_REQUESTED, PING, SUBSCRIPTION_INVALID
from shared.metrics import DEFAULT_PORT as DEFAULT_METRICS_PORT
from tests.conftest import IN_CI

REPO = Path(__file__).resolve().parent.parent
KNATIVE = REPO / "knative"
OPENFAAS = REPO / "openfaas"
STACK = REPO / "stack.yml"
SCHEMAS = REPO / "tests" / "manifest_schemas"
FUNCTIONS = sorted(p.name for p in (REPO / "functions").iterdir() if (p / "main.py").exists())
SERVICE = ("serving.knative.dev/v1", "Service")
DISPATCHERS = [f for f in FUNCTIONS if f.startswith("dispatch-")]
#: Where every function reads its secrets from (PUSH_SECRETS_DIR; OpenFaaS mounts them there).
SECRETS_DIR = "/var/openfaas/secrets"
#: Ports Knative's queue-proxy sidecar holds in every pod of a Service (8012/8013 proxy, 8022
#: admin, 9090 autoscaler metrics, 9091 user metrics, 8008 profiling); its webhook refuses them
#: as a containerPort (knative.dev/serving, pkg/apis/serving/k8s_validation.go, reservedPorts).
KNATIVE_RESERVED_PORTS = {8008, 8012, 8013, 8022, 9090, 9091}
#: What each function takes from the broker.
TAKES = {name: {NOTIFICATION_REQUESTED} for name in DISPATCHERS} | {
    "cleanup-invalid-tokens": {SUBSCRIPTION_INVALID}
}

Document = dict[str, Any]


# --- loading --------------------------------------------------------------------------------


def kustomize_files(folder: Path) -> tuple[set[Path], set[Path]]:
    """(resource files, other kustomize inputs: kustomizations, configurations, patch files) of
    the kustomization and components under ``folder``."""
    resources, others = set(), set()
    for kustomization in folder.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        others.add(kustomization)
        for entry in spec.get("resources", []):
            resources.add((kustomization.parent / entry).resolve())
        for entry in spec.get("configurations", []):
            others.add((kustomization.parent / entry).resolve())
        for patch in spec.get("patches", []):
            if "path" in patch:
                others.add((kustomization.parent / patch["path"]).resolve())
    return resources, others


def yaml_documents(paths: Iterable[Path]) -> list[tuple[str, Document]]:
    return [
        (f"{path.relative_to(REPO)}#{index}", document)
        for path in sorted(paths)
        for index, document in enumerate(yaml.safe_load_all(path.read_text()))
        if document is not None
    ]


def load_knative() -> list[tuple[str, Document]]:
    """(where, document) for every resource of knative/'s kustomization and of all its
    components: the whole deployment with every option on (patches are checked after a build)."""
    return yaml_documents(kustomize_files(KNATIVE)[0])


def load_openfaas() -> list[tuple[str, Document]]:
    """The Kubernetes manifests shipped for OpenFaaS (openfaas/)."""
    return yaml_documents(OPENFAAS.glob("*.yaml"))


def kustomization() -> Document:
    return yaml.safe_load((KNATIVE / "kustomization.yaml").read_text())


def component_folders() -> list[str]:
    """The folders of knative/ holding a kustomize Component, relative to knative/."""
    return sorted(
        path.parent.relative_to(KNATIVE).as_posix()
        for path in KNATIVE.rglob("kustomization.yaml")
        if yaml.safe_load(path.read_text()).get("kind") == "Component"
    )


@pytest.fixture(scope="module")
def schemas() -> Path:
    if not (SCHEMAS / "openfaas" / "stack_v1.json").is_file():
        pytest.fail(
            f"the reference schemas are missing: expected {SCHEMAS}",
            pytrace=False,
        )
    return SCHEMAS


@pytest.fixture(scope="module")
def knative() -> list[tuple[str, Document]]:
    return load_knative()


@pytest.fixture(scope="module")
def documents(knative) -> list[Document]:
    return [document for _, document in knative]


@pytest.fixture(scope="module")
def stack() -> Document:
    return yaml.safe_load(STACK.read_text())


def kind(document: Document) -> tuple[str, str]:
    return document.get("apiVersion", ""), document.get("kind", "")


def of_kind(documents: Iterable[Document], wanted: tuple[str, str]) -> list[Document]:
    return [d for d in documents if kind(d) == wanted]


def services(documents: Iterable[Document]) -> dict[str, Document]:
    return {d["metadata"]["name"]: d for d in of_kind(documents, SERVICE)}


def annotations(service: Document) -> dict[str, Any]:
    return service["spec"]["template"].get("metadata", {}).get("annotations", {})


def container(service: Document) -> Document:
    return service["spec"]["template"]["spec"]["containers"][0]


def env(service: Document) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(service).get("env", [])}


# --- schemas --------------------------------------------------------------------------------


def honour_preserved_fields(schema: Any) -> Any:
    """The schema as the API server applies it: an object marked
    ``x-kubernetes-preserve-unknown-fields`` keeps fields it does not list (Knative's delivery
    spec is one, for its feature-gated fields), whatever ``additionalProperties`` the conversion to
    JSON Schema gave it."""
    if isinstance(schema, dict):
        relaxed = {key: honour_preserved_fields(value) for key, value in schema.items()}
        if relaxed.get("x-kubernetes-preserve-unknown-fields") is True:
            relaxed.pop("additionalProperties", None)
        return relaxed
    if isinstance(schema, list):
        return [honour_preserved_fields(value) for value in schema]
    return schema


def schema_problems(document: Document, schemas: Path) -> list[str]:
    """Why ``document`` does not validate against its schema (apiVersion + kind); [] if it does.
    Kubernetes' core group (apiVersion ``v1``) is the folder ``core``."""
    api_version, kind_ = kind(document)
    group, _, version = api_version.rpartition("/")
    path = schemas / (group or "core") / f"{kind_.lower()}_{version}.json"
    if not version or not kind_ or not path.is_file():
        return [f"no schema for apiVersion {api_version!r} kind {kind_!r} (looked for {path})"]
    schema = honour_preserved_fields(json.loads(path.read_text()))
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator_class(schema).iter_errors(document)
    ]


def test_the_reference_schemas_are_there(schemas):
    assert (schemas / "serving.knative.dev" / "service_v1.json").is_file()


@pytest.mark.parametrize("where,document", load_knative(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_knative_document_validates_against_its_schema(where, document, schemas):
    assert schema_problems(document, schemas) == []


@pytest.mark.parametrize("where,document", load_openfaas(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_openfaas_manifest_validates_against_its_schema(where, document, schemas):
    assert schema_problems(document, schemas) == []


def test_stack_yml_validates_against_the_openfaas_schema(stack, schemas):
    schema = json.loads((schemas / "openfaas" / "stack_v1.json").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(stack)]
    assert errors == []


def test_the_schema_check_catches_unknown_fields_and_kinds(knative, schemas):
    service = copy.deepcopy(services(d for _, d in knative)["subscribe"])
    service["spec"]["template"]["spec"]["containerConcurency"] = 10  # misspelt
    assert any("containerConcurency" in p for p in schema_problems(service, schemas))
    assert schema_problems({"apiVersion": "v1", "kind": "Secret"}, schemas)
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "a"},
              "spec": {"podSelector": {}, "ingres": []}}
    assert any("ingres" in p for p in schema_problems(policy, schemas))


def test_the_delivery_spec_keeps_the_fields_knative_preserves(schemas):
    """Broker.spec.delivery is x-kubernetes-preserve-unknown-fields in Knative's CRD (timeout,
    retryAfterMax are feature-gated): the check accepts them, as the API server does."""
    broker = {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "metadata": {"name": "b"},
              "spec": {"delivery": {"retry": 1, "timeout": "PT1S", "retryAfterMax": "PT1S"}}}
    assert schema_problems(broker, schemas) == []


# --- annotation and label values are strings ------------------------------------------------


def unquoted_values(knative: Iterable[tuple[str, Document]], stack: Document) -> list[str]:
    """Every annotation or label value that YAML reads as something else than a string (a
    number, a boolean): Kubernetes rejects those, and faas-cli turns them into other strings."""
    problems = []

    def check(where: str, mapping: dict[str, Any] | None) -> None:
        for key, value in (mapping or {}).items():
            if not isinstance(value, str):
                problems.append(f"{where}: {key}: {value!r} is not a string (quote it)")

    for where, document in knative:
        metadatas = [document.get("metadata", {})]
        template = document.get("spec", {}).get("template")
        if isinstance(template, dict):
            metadatas.append(template.get("metadata", {}))
        for metadata in metadatas:
            check(where, metadata.get("annotations"))
            check(where, metadata.get("labels"))
    for name, function in stack.get("functions", {}).items():
        check(f"stack.yml {name}", function.get("annotations"))
        check(f"stack.yml {name}", function.get("labels"))
    return problems


def test_annotation_values_are_strings(knative, stack):
    assert unquoted_values(knative, stack) == []


def test_the_string_check_catches_unquoted_values():
    bad = yaml.safe_load(
        "metadata: {annotations: {autoscaling.knative.dev/max-scale: 5}}\n"
        "spec: {template: {metadata: {labels: {enabled: true}}}}"
    )
    stack = yaml.safe_load("functions: {f: {labels: {com.openfaas.scale.min: 1}}}")
    assert len(unquoted_values([("bad", bad)], stack)) == 3


# --- min-scale <= max-scale -----------------------------------------------------------------


def scale_bounds_problems(documents: Iterable[Document], stack: Document) -> list[str]:
    problems = []
    pairs = [
        (f"knative {name}", annotations(service), "autoscaling.knative.dev/min-scale",
         "autoscaling.knative.dev/max-scale")
        for name, service in services(documents).items()
    ] + [
        (f"stack.yml {name}", function.get("labels", {}), "com.openfaas.scale.min", "com.openfaas.scale.max")
        for name, function in stack.get("functions", {}).items()
    ]
    for where, values, low_key, high_key in pairs:
        try:
            low, high = int(values.get(low_key, 0)), int(values.get(high_key, 0))
        except (TypeError, ValueError):
            problems.append(f"{where}: {low_key}/{high_key} are not whole numbers")
            continue
        if high and low > high:  # 0 or absent max: unbounded
            problems.append(f"{where}: {low_key} {low} > {high_key} {high}")
    return problems


def test_min_scale_is_not_above_max_scale(documents, stack):
    assert scale_bounds_problems(documents, stack) == []


def test_the_scale_check_catches_min_above_max(documents):
    service = copy.deepcopy(services(documents)["subscribe"])
    annotations(service)["autoscaling.knative.dev/min-scale"] = "20"
    stack = {"functions": {"f": {"labels": {"com.openfaas.scale.min": "3", "com.openfaas.scale.max": "2"}}}}
    assert len(scale_bounds_problems([service], stack)) == 2


# --- Triggers name existing Services --------------------------------------------------------


def dangling_subscribers(documents: list[Document]) -> list[str]:
    names = set(services(documents))
    brokers = {d["metadata"]["name"] for d in of_kind(documents, ("eventing.knative.dev/v1", "Broker"))}
    problems = []
    for trigger in of_kind(documents, ("eventing.knative.dev/v1", "Trigger")):
        where = f"Trigger {trigger['metadata']['name']}"
        ref = trigger["spec"].get("subscriber", {}).get("ref", {})
        if (ref.get("apiVersion"), ref.get("kind")) != SERVICE or ref.get("name") not in names:
            problems.append(f"{where}: subscriber {ref} is not a Service of these manifests")
        if trigger["spec"].get("broker") not in brokers:
            problems.append(f"{where}: broker {trigger['spec'].get('broker')!r} is not defined")
    return problems


def test_every_trigger_subscriber_is_an_existing_service(documents):
    assert dangling_subscribers(documents) == []


def test_the_subscriber_check_catches_a_missing_service(documents):
    trimmed = [d for d in documents if not (kind(d) == SERVICE and d["metadata"]["name"] == "dispatch-apns")]
    assert any("dispatch-apns" in p for p in dangling_subscribers(trimmed))


# --- every event type a function emits, and every one it takes, has a Trigger ------------------
#
# What a function emits is read from the code, not listed here: the event types are the string
# constants of shared/events.py (those it takes from shared/core.py included); the functions of shared/events.py that make an event
# (``{"type": CONSTANT, ...}``) are its makers; a function emits the types of the makers called,
# and of the ``"type": CONSTANT`` mappings written, in the shared modules its main.py imports
# (transitively). A new event type sent anywhere a function reaches needs a Trigger.


def event_type_constants(events_py: Path) -> dict[str, str]:
    """Module-level string constants of shared/events.py: name -> value; those it imports from
    shared/core.py (where the event type names live, below storage) included."""
    constants = {}
    for node in ast.parse(events_py.read_text()).body:
        if (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        ):
            constants[node.targets[0].id] = node.value.value
        elif isinstance(node, ast.ImportFrom) and node.module == "shared.core" and not node.level:
            core = event_type_constants(events_py.parent / "core.py")
            constants |= {alias.asname or alias.name: core[alias.name] for alias in node.names if alias.name in core}
    return constants


def type_entries(tree: ast.AST) -> Iterable[ast.expr]:
    """The values of every ``"type": ...`` entry of a dict display under ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "type":
                    yield value


def event_makers(events_py: Path, constants: dict[str, str]) -> dict[str, set[str]]:
    """Functions of shared/events.py that make an event -> the event types they give it."""
    makers: dict[str, set[str]] = {}
    for node in ast.parse(events_py.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            types = {constants[v.id] for v in type_entries(node) if isinstance(v, ast.Name) and v.id in constants}
            if types:
                makers[node.name] = types
    return makers


def shared_imports(path: Path, root: Path) -> set[Path]:
    """The files of the ``shared`` package that ``path`` imports (anywhere in it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] != "shared":
                continue
            module = root.joinpath(*name.split("."))
            found |= {c for c in (module.with_suffix(".py"), module / "__init__.py") if c.is_file()}
    return found


def emitted_in(path: Path, constants: dict[str, str], makers: dict[str, set[str]]) -> set[str]:
    """Event types the code of ``path`` sends: calls to shared.events' makers, and ``"type":``
    entries holding one of its constants."""
    tree = ast.parse(path.read_text())
    from_events: dict[str, str] = {}  # local name -> name in shared.events
    events_modules: set[str] = set()  # local names of the shared.events module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "shared.events" and not node.level:
            from_events |= {alias.asname or alias.name: alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "shared" and not node.level:
            events_modules |= {alias.asname or alias.name for alias in node.names if alias.name == "events"}

    def original(expression: ast.expr) -> str | None:
        if isinstance(expression, ast.Name):
            return from_events.get(expression.id)
        if isinstance(expression, ast.Attribute) and isinstance(expression.value, ast.Name):
            return expression.attr if expression.value.id in events_modules else None
        return None

    types = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and original(node.func) in makers:
            types |= makers[original(node.func)]
    types |= {constants[original(v)] for v in type_entries(tree) if original(v) in constants}
    return types


def emitted_event_types(root: Path) -> dict[str, set[str]]:
    """Function name -> the event types it sends, read from the code under ``root``."""
    events_py = root / "shared" / "events.py"
    constants = event_type_constants(events_py)
    makers = event_makers(events_py, constants)
    emits = {}
    for main in sorted((root / "functions").glob("*/main.py")):
        seen, queue = set(), [main]
        while queue:
            path = queue.pop()
            if path not in seen:
                seen.add(path)
                queue += shared_imports(path, root)
        emits[main.parent.name] = set().union(*(emitted_in(path, constants, makers) for path in seen))
    return emits


#: The event types each function sends, from the code (today: the dispatchers' dead-token reports).
EMITS = emitted_event_types(REPO)


def trigger_types(documents: list[Document]) -> dict[str, set[str]]:
    """Event type -> the Services a Trigger delivers it to."""
    routes: dict[str, set[str]] = {}
    for trigger in of_kind(documents, ("eventing.knative.dev/v1", "Trigger")):
        event_type = trigger["spec"].get("filter", {}).get("attributes", {}).get("type")
        routes.setdefault(event_type, set()).add(trigger["spec"]["subscriber"]["ref"]["name"])
    return routes


def unrouted_events(documents: list[Document], emits: dict[str, set[str]] = EMITS) -> list[str]:
    routes = trigger_types(documents)
    problems = [
        f"{function} emits {event_type}, which no Trigger delivers"
        for function, types in emits.items() for event_type in types if not routes.get(event_type)
    ]
    problems += [
        f"no Trigger delivers {event_type} to {function}"
        for function, types in TAKES.items() for event_type in types
        if function not in routes.get(event_type, set())
    ]
    return problems


def test_every_emitted_event_type_has_a_trigger(documents):
    assert unrouted_events(documents) == []


def test_the_routing_check_catches_an_unrouted_event_type(documents):
    trimmed = [
        d for d in documents
        if not (kind(d)[1] == "Trigger" and d["spec"]["filter"]["attributes"]["type"] == SUBSCRIPTION_INVALID)
    ]
    assert any(SUBSCRIPTION_INVALID in p for p in unrouted_events(trimmed))


def test_the_emitted_event_types_are_read_from_the_code():
    """The dispatchers' dead-token reports (shared/dispatch/dead_tokens.py calls
    invalid_tokens_event) are found; importing shared/events.py, as cleanup-invalid-tokens does
    to read those reports, is not sending one."""
    assert set(EMITS) == set(FUNCTIONS)
    assert all(SUBSCRIPTION_INVALID in EMITS[name] for name in DISPATCHERS)
    assert EMITS["cleanup-invalid-tokens"] == {PING}  # the flush tick, when held work is due
    assert EMITS["subscribe"] == set()


def test_a_new_event_type_sent_by_a_function_needs_a_trigger(documents, tmp_path):
    """A new constant and maker in shared/events.py, called from a module a function imports
    through another, is an emitted type; without a Trigger for it the routing check fails."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "__init__.py").write_text("")
    (tmp_path / "shared" / "events.py").write_text(
        'REFRESHED = "org.wikimedia.push.subscription.refreshed.v1"\n'
        "def refreshed_event(source):\n"
        '    return CloudEvent({"type": REFRESHED, "source": source}, {})\n'
    )
    (tmp_path / "shared" / "notify.py").write_text(
        "from shared.events import refreshed_event as made\n"
        "def tell():\n"
        '    return made("/subscribe")\n'
    )
    (tmp_path / "shared" / "api.py").write_text("from shared import notify\n")
    (tmp_path / "functions" / "subscribe").mkdir(parents=True)
    (tmp_path / "functions" / "subscribe" / "main.py").write_text("from shared.api import tell\n")
    emits = emitted_event_types(tmp_path)
    assert emits == {"subscribe": {"org.wikimedia.push.subscription.refreshed.v1"}}
    assert unrouted_events(documents, emits) == [
        "subscribe emits org.wikimedia.push.subscription.refreshed.v1, which no Trigger delivers"
    ]


def test_dispatchers_reports_reach_the_broker_with_the_cleanup_trigger(documents):
    """K_SINK (SinkBinding) points at the broker whose Trigger takes the reports to clean-up."""
    bindings = of_kind(documents, ("sources.knative.dev/v1", "SinkBinding"))
    assert len(bindings) == 1
    binding = bindings[0]["spec"]
    selector = binding["subject"]["selector"]["matchLabels"]
    bound = {
        name for name, service in services(documents).items()
        if selector.items() <= service["metadata"].get("labels", {}).items()
    }
    assert bound == set(DISPATCHERS)
    assert (binding["sink"]["ref"]["kind"], binding["sink"]["ref"]["name"]) == ("Broker", "push")
    cleanup_triggers = [
        t for t in of_kind(documents, ("eventing.knative.dev/v1", "Trigger"))
        if t["spec"]["filter"]["attributes"]["type"] == SUBSCRIPTION_INVALID
    ]
    assert {t["spec"]["broker"] for t in cleanup_triggers} == {"push"}


def test_the_broker_is_durable_and_dead_letters_go_to_the_cleanup_route(documents):
    (broker,) = of_kind(documents, ("eventing.knative.dev/v1", "Broker"))
    assert broker["metadata"]["annotations"]["eventing.knative.dev/broker.class"] == "Kafka"
    config = broker["spec"]["config"]
    (kafka,) = [g for g in kustomization()["configMapGenerator"] if g["name"] == config["name"]]
    assert {"bootstrap.servers", "default.topic.replication.factor"} <= {
        literal.split("=", 1)[0] for literal in kafka["literals"]}
    sink = broker["spec"]["delivery"]["deadLetterSink"]
    assert (sink["ref"]["name"], sink["uri"]) == ("cleanup-invalid-tokens", "/dead-letters")


def test_the_daily_ping_goes_to_cleanup(documents):
    pings = [p for p in of_kind(documents, ("sources.knative.dev/v1", "PingSource")) if p["metadata"]["name"] == "cleanup-daily"]
    assert len(pings) == 1
    assert pings[0]["spec"]["sink"]["ref"]["name"] == "cleanup-invalid-tokens"
    assert len(pings[0]["spec"]["schedule"].split()) == 5


def test_the_held_work_tick_reaches_cleanup_and_its_reply_every_dispatcher(documents):
    """Held wake-ups need a tick without keeping the dispatchers awake: a PingSource through
    the broker to clean-up, whose reply (a flush tick) the dispatchers' Triggers take."""
    (ping,) = [p for p in of_kind(documents, ("sources.knative.dev/v1", "PingSource")) if p["metadata"]["name"] == "held-check"]
    assert ping["spec"]["sink"]["ref"]["kind"] == "Broker"
    tick = {"type": PING, **ping["spec"]["ceOverrides"]["extensions"]}
    triggers = of_kind(documents, ("eventing.knative.dev/v1", "Trigger"))

    def takers(event: dict[str, str]) -> set[str]:
        return {t["spec"]["subscriber"]["ref"]["name"] for t in triggers
                if t["spec"]["filter"]["attributes"].items() <= event.items()}

    assert takers(tick) == {"cleanup-invalid-tokens"}
    assert takers({"type": PING, "pushtick": FLUSH_TICK}) == set(DISPATCHERS)
    minutes = ping["spec"]["schedule"].split()[0]
    assert minutes.startswith("*/") and int(minutes[2:]) >= 5  # not every minute


def test_openfaas_cleanup_posts_flush_ticks_to_every_dispatcher(stack):
    cleanup = stack["functions"]["cleanup-invalid-tokens"]
    urls = cleanup["environment"]["PUSH_FLUSH_TICK_URLS"].split(",")
    assert sorted(url.rsplit("/", 1)[1].split(".")[0] for url in urls) == sorted(DISPATCHERS)
    assert all("/async-function/" in url for url in urls)


# --- every function is deployed on both platforms ---------------------------------------------


def undeployed_functions(functions: list[str], documents: list[Document], stack: Document) -> list[str]:
    knative_services = services(documents)
    problems = []
    for function in functions:
        service = knative_services.get(function)
        if service is None:
            problems.append(f"{function}: no Knative Service in knative/")
        elif container(service)["image"] != f"push-functions/{function}":
            problems.append(f"{function}: Knative image is not push-functions/{function}")
        entry = stack.get("functions", {}).get(function)
        if entry is None:
            problems.append(f"{function}: not in stack.yml")
        elif entry.get("build_args", {}).get("FUNCTION") != function:
            problems.append(f"{function}: stack.yml does not build it with FUNCTION={function}")
    return problems


def test_every_function_is_deployed_on_knative_and_openfaas(documents, stack):
    assert undeployed_functions(FUNCTIONS, documents, stack) == []


def test_the_deployment_check_catches_a_missing_function(documents, stack):
    assert len(undeployed_functions(FUNCTIONS + ["dispatch-sms"], documents, stack)) == 2


def test_every_knative_image_is_set_in_the_kustomization(documents):
    images = {entry["name"] for entry in yaml.safe_load((KNATIVE / "kustomization.yaml").read_text())["images"]}
    used = {c["image"] for s in services(documents).values() for c in s["spec"]["template"]["spec"]["containers"]}
    assert used <= images


def unpinned_images(images: list[Document]) -> list[str]:
    """kustomize ``images`` entries that leave the tag to the registry (``latest``)."""
    problems = []
    for entry in images:
        digest = entry.get("digest")
        if digest is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", str(digest)):
            problems.append(f"{entry['name']}: digest {digest!r} is not sha256:<64 hex digits>")
        elif not digest and not entry.get("newTag"):
            problems.append(f"{entry['name']}: neither newTag nor digest")
    return problems


def test_every_kustomization_image_is_pinned_by_tag_or_digest():
    images = yaml.safe_load((KNATIVE / "kustomization.yaml").read_text())["images"]
    assert unpinned_images(images) == []


def test_the_pin_check_catches_an_image_left_at_latest():
    assert len(unpinned_images([{"name": "a"}, {"name": "b", "digest": "sha256:abc"}, {"name": "c", "newTag": "1"}])) == 2


def test_every_knative_manifest_is_listed_in_a_kustomization():
    resources, others = kustomize_files(KNATIVE)
    files = {p.resolve() for p in KNATIVE.rglob("*.yaml")}
    assert files - others == resources
    assert all(p.exists() for p in resources | others)


def test_every_component_folder_is_offered_in_the_kustomization():
    """Each component is named in kustomization.yaml (listed or commented out), so an operator
    finds every option in the one file."""
    text = (KNATIVE / "kustomization.yaml").read_text()
    for folder in component_folders():
        assert re.search(rf"^\s*(# )?- {re.escape(folder)}$", text, re.MULTILINE), folder


# --- Knative settings the README asks for ---------------------------------------------------


def test_dispatchers_and_cleanup_are_cluster_local_and_the_api_public(documents):
    for name, service in services(documents).items():
        visibility = service["metadata"].get("labels", {}).get("networking.knative.dev/visibility")
        if name in ("subscribe", "unsubscribe"):
            assert visibility is None, name
        else:
            assert visibility == "cluster-local", name


@pytest.mark.parametrize("function", FUNCTIONS)
def test_every_function_scales_to_zero_and_probes_readyz_as_knative_recommends(documents, function):
    """No periodSeconds on the readiness probe: Knative then probes aggressively while a replica
    starts (a scale from zero answers sooner); a period turns that off."""
    service = services(documents)[function]
    assert annotations(service)["autoscaling.knative.dev/min-scale"] == "0"
    probe = container(service)["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"
    assert "periodSeconds" not in probe


@pytest.mark.parametrize("function", FUNCTIONS)
def test_every_function_reads_its_settings_from_a_required_config(documents, function):
    (source,) = container(services(documents)[function])["envFrom"]
    assert source["configMapRef"]["name"] == "push-config"
    assert not source["configMapRef"].get("optional")


@pytest.mark.parametrize("function", FUNCTIONS)
def test_every_function_runs_on_a_read_only_root_with_a_writable_tmp(documents, stack, function):
    service = services(documents)[function]
    assert container(service)["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container(service)["volumeMounts"]}
    volumes = {v["name"]: v for v in service["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert stack["functions"][function]["readonly_root_filesystem"] is True


def test_the_shipped_config_names_the_token_issuer_and_audience(stack):
    (config,) = [g for g in kustomization()["configMapGenerator"] if g["name"] == "push-config"]
    assert {"PUSH_AUTH_ISSUER", "PUSH_AUTH_AUDIENCE"} <= {literal.split("=", 1)[0] for literal in config["literals"]}
    for name in ("subscribe", "unsubscribe"):
        environment = stack["functions"][name]["environment"]
        assert environment["PUSH_AUTH_ISSUER"] == "${PUSH_AUTH_ISSUER:-}"
        assert environment["PUSH_AUTH_AUDIENCE"] == "${PUSH_AUTH_AUDIENCE:-}"


def needed_secrets(function: str, stack: Document) -> set[str]:
    """The secret files a function reads: the database URL for every one, and its credentials
    (stack.yml's list; the two platforms are checked to agree below)."""
    return {"push-database-url"} | set(stack["functions"][function].get("secrets", []))


def secret_file_problems(service: Document, needed: set[str]) -> list[str]:
    """How ``service`` fails to give each ``needed`` secret as a read-only file named as
    PUSH_SECRETS_DIR expects, with no secret in an environment variable."""
    problems = []
    function = container(service)
    for variable in function.get("env", []):
        if "secretKeyRef" in variable.get("valueFrom", {}):
            problems.append(f"{variable['name']} comes from a Secret as an environment variable, not as a file")
    if env(service).get("PUSH_SECRETS_DIR") != SECRETS_DIR:
        problems.append(f"PUSH_SECRETS_DIR is not {SECRETS_DIR}")
    volumes = {v["name"]: v for v in service["spec"]["template"]["spec"].get("volumes", [])}
    # Scratch space (the emptyDir at /tmp) is not where secrets are.
    mounts = [m for m in function.get("volumeMounts", []) if "emptyDir" not in volumes.get(m["name"], {})]
    problems += [f"{m['name']} is mounted at {m['mountPath']}, not {SECRETS_DIR}" for m in mounts if m["mountPath"] != SECRETS_DIR]
    problems += [f"{m['name']} is mounted writable" for m in mounts if not m.get("readOnly")]
    files: dict[str, Document] = {}  # file name in SECRETS_DIR -> the secret source giving it
    for mount in mounts:
        for source in volumes.get(mount["name"], {}).get("projected", {}).get("sources", []):
            for item in source.get("secret", {}).get("items", []):
                if item["key"] == item["path"]:
                    files[item["path"]] = source["secret"]
    for secret in sorted(needed):
        if secret not in files:
            problems.append(f"needs {secret}, which no volume mounts as {SECRETS_DIR}/{secret}")
    if files.get("push-database-url", {}).get("optional"):
        problems.append("push-database-url is optional: without it the function would fall back to SQLite")
    return problems


@pytest.mark.parametrize("function", FUNCTIONS)
def test_every_function_reads_the_secrets_it_needs_from_mounted_files(documents, stack, function):
    assert secret_file_problems(services(documents)[function], needed_secrets(function, stack)) == []


def test_the_secret_file_check_catches_a_missing_mount_and_a_secret_in_the_environment(documents, stack):
    """cleanup-invalid-tokens as it was: the database URL from the environment, nothing mounted."""
    service = copy.deepcopy(services(documents)["cleanup-invalid-tokens"])
    function = container(service)
    function.pop("volumeMounts", None)
    function["env"].append(
        {"name": "PUSH_DATABASE_URL",
         "valueFrom": {"secretKeyRef": {"name": "push-database-url", "key": "push-database-url"}}}
    )
    problems = secret_file_problems(service, needed_secrets("cleanup-invalid-tokens", stack))
    assert any("PUSH_DATABASE_URL comes from a Secret" in p for p in problems)
    assert any("needs push-database-url" in p for p in problems)


def test_the_secret_file_check_catches_an_optional_database_url(documents, stack):
    service = copy.deepcopy(services(documents)["subscribe"])
    volume = service["spec"]["template"]["spec"]["volumes"][0]
    volume["projected"]["sources"][0]["secret"]["optional"] = True
    assert any("optional" in p for p in secret_file_problems(service, needed_secrets("subscribe", stack)))


# --- ports: none of Knative's, and Prometheus scrapes the metrics port -----------------------


def metrics_port(environment: dict[str, Any]) -> int:
    """The port a function serves metrics on: PUSH_METRICS_PORT, else shared.metrics' default."""
    return int(environment.get("PUSH_METRICS_PORT", DEFAULT_METRICS_PORT))


def reserved_port_problems(documents: Iterable[Document]) -> list[str]:
    problems = []
    for name, service in services(documents).items():
        spec = service["spec"]["template"]["spec"]
        for each in spec["containers"]:
            problems += [
                f"{name}: containerPort {port['containerPort']} is Knative's"
                for port in each.get("ports", []) if int(port["containerPort"]) in KNATIVE_RESERVED_PORTS
            ]
        if name in FUNCTIONS and metrics_port(env(service)) in KNATIVE_RESERVED_PORTS:
            problems.append(f"{name}: metrics port {metrics_port(env(service))} is Knative's")
        scraped = annotations(service).get("prometheus.io/port")
        if scraped is not None and int(scraped) in KNATIVE_RESERVED_PORTS:
            problems.append(f"{name}: prometheus.io/port {scraped} is Knative's")
    return problems


def test_no_knative_service_uses_a_port_knatives_queue_proxy_holds(documents):
    assert DEFAULT_METRICS_PORT not in KNATIVE_RESERVED_PORTS
    assert reserved_port_problems(documents) == []


def test_the_port_check_catches_the_queue_proxys_user_metrics_port(documents):
    service = copy.deepcopy(services(documents)["dispatch-fcm"])
    annotations(service)["prometheus.io/port"] = "9091"
    for variable in container(service)["env"]:
        if variable["name"] == "PUSH_METRICS_PORT":
            variable["value"] = "9091"
    container(service)["ports"][0]["containerPort"] = 8012
    assert len(reserved_port_problems([service])) == 3


@pytest.mark.parametrize("function", FUNCTIONS)
def test_prometheus_scrapes_the_metrics_port_on_both_platforms(documents, stack, function):
    service = services(documents)[function]
    entry = stack["functions"][function]
    assert int(annotations(service)["prometheus.io/port"]) == metrics_port(env(service))
    assert int(entry["annotations"]["prometheus.io/port"]) == metrics_port(entry.get("environment", {}))


# --- timing: the numbers derive from one another (docs/deploy.md, "Timing") -------------------
#
# D = PUSH_DISPATCH_DEADLINE_SECONDS: sends still running then count as transient.
# M = ANSWER_MARGIN_SECONDS: after the deadline, the outcomes' write may wait for a pooled
#     connection (shared/db.py, pool_timeout 10 s) and a dead-token report for K_SINK (5 s): an
#     event is answered within D + M.
# G = gunicorn's graceful timeout: on SIGTERM, how long an event in flight may still run: >= D + M.
# Q = queue-proxy's drain: Knative sends SIGTERM to the function only after queue-proxy has had
#     no new request for 30 s (knative.dev/serving, pkg/queue/sharedmain/main.go,
#     drainSleepDuration), and kills the pod timeoutSeconds (T) after it began stopping
#     (terminationGracePeriodSeconds = timeoutSeconds, pkg/reconciler/revision/resources/deploy.go):
#     an event that arrived just before the drain needs Q + G <= T.
# T = timeoutSeconds is also the longest request the revision lets run: the claim leases
#     (PUSH_DELIVERY_LEASE_SECONDS, PUSH_PENDING_LEASE_SECONDS) must outlast it, so no claim of a
#     live invocation lapses, and the broker's delivery.timeout must be above it, so the broker
#     does not retry an event that is still being worked on.
# OpenFaaS Pro: no queue-proxy; the pod gets write_timeout + 2 s after SIGTERM (faas-netes, the
#     operator): G < write_timeout + 2, and write_timeout is the longest request (gateway
#     upstream_timeout, queue-worker ack_wait are set from it), so the leases outlast it.

QUEUE_PROXY_DRAIN_SECONDS = 30
ANSWER_MARGIN_SECONDS = 15


def graceful_timeout(environment: dict[str, Any]) -> int:
    """How long gunicorn lets requests in flight finish after SIGTERM, as it reads
    GUNICORN_CMD_ARGS (the image's command leaves that setting to it; default 30 s)."""
    from gunicorn.config import Config

    config = Config()
    parsed = config.parser().parse_args(shlex.split(environment.get("GUNICORN_CMD_ARGS", "")))
    return parsed.graceful_timeout if parsed.graceful_timeout is not None else config.graceful_timeout


def go_seconds(duration: str) -> float:
    """A Go duration as OpenFaaS reads write_timeout (``90s``, ``1m30s``), in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def iso_seconds(duration: str) -> float:
    """An ISO 8601 duration as Knative's delivery spec writes them (``PT120S``, ``PT1M30S``)."""
    match = re.fullmatch(r"PT(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?", duration)
    if not match or duration == "PT":
        raise ValueError(f"not an ISO 8601 duration: {duration!r}")
    hours, minutes, seconds = (float(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def broker_delivery(documents: Iterable[Document]) -> Document:
    (broker,) = of_kind(documents, ("eventing.knative.dev/v1", "Broker"))
    return broker["spec"]["delivery"]


def timing_problems(documents: Iterable[Document], stack: Document) -> list[str]:
    """The rules above, for every dispatcher on both platforms."""
    documents = list(documents)
    problems = []
    delivery_timeout = iso_seconds(broker_delivery(documents).get("timeout", "PT0S"))
    knative_services = services(documents)
    for name in DISPATCHERS:
        service = knative_services[name]
        environment = stack["functions"][name].get("environment", {})
        write_timeout = go_seconds(environment.get("write_timeout", "30s"))
        platforms = [
            ("knative", env(service), service["spec"]["template"]["spec"]["timeoutSeconds"],
             service["spec"]["template"]["spec"]["timeoutSeconds"] - QUEUE_PROXY_DRAIN_SECONDS),
            ("stack.yml", environment, write_timeout, write_timeout + 2),
        ]
        for where, variables, longest, left_for_gunicorn in platforms:
            deadline = int(variables["PUSH_DISPATCH_DEADLINE_SECONDS"])
            drain = graceful_timeout(variables)
            answered = deadline + ANSWER_MARGIN_SECONDS
            if drain < answered:
                problems.append(f"{where} {name}: drains {drain} s, less than the {answered} s an event may take")
            if drain > left_for_gunicorn:
                problems.append(f"{where} {name}: drains {drain} s, more than the {left_for_gunicorn:g} s the pod is given")
            if longest < answered:
                problems.append(f"{where} {name}: requests are cut at {longest:g} s, before the {answered} s an event may take")
            for lease in ("PUSH_DELIVERY_LEASE_SECONDS", "PUSH_PENDING_LEASE_SECONDS"):
                if int(variables[lease]) <= longest:
                    problems.append(f"{where} {name}: {lease} {variables[lease]} is not above the {longest:g} s a request may run")
        timeout = service["spec"]["template"]["spec"]["timeoutSeconds"]
        if delivery_timeout <= timeout:
            problems.append(f"knative {name}: the broker's delivery timeout {delivery_timeout:g} s is not above timeoutSeconds {timeout}")
    return problems


def test_the_dispatchers_timing_adds_up_on_both_platforms(documents, stack):
    assert timing_problems(documents, stack) == []


def test_the_timing_check_catches_each_broken_rule(documents, stack):
    knative = [copy.deepcopy(d) for d in documents]
    apns = services(knative)["dispatch-apns"]
    container(apns)["env"] = [e for e in container(apns)["env"] if e["name"] != "GUNICORN_CMD_ARGS"]
    services(knative)["dispatch-fcm"]["spec"]["template"]["spec"]["timeoutSeconds"] = 90
    broker_delivery(knative)["timeout"] = "PT100S"
    openfaas = copy.deepcopy(stack)
    openfaas["functions"]["dispatch-webpush"]["environment"] = {
        **stack["functions"]["dispatch-webpush"]["environment"], "write_timeout": "60s"
    }
    problems = timing_problems(knative, openfaas)
    assert "knative dispatch-apns: drains 30 s, less than the 75 s an event may take" in problems
    assert "knative dispatch-fcm: drains 75 s, more than the 60 s the pod is given" in problems
    assert "stack.yml dispatch-webpush: drains 75 s, more than the 62 s the pod is given" in problems
    assert "stack.yml dispatch-webpush: requests are cut at 60 s, before the 75 s an event may take" in problems
    assert "knative dispatch-webpush: the broker's delivery timeout 100 s is not above timeoutSeconds 105" in problems


def test_the_flush_tick_triggers_wait_as_long_as_the_broker(documents):
    """A flush may run as long as an event: its Trigger's own delivery timeout is the Broker's."""
    for trigger in of_kind(documents, ("eventing.knative.dev/v1", "Trigger")):
        delivery = trigger["spec"].get("delivery")
        if delivery is not None:
            assert delivery["timeout"] == broker_delivery(documents)["timeout"], trigger["metadata"]["name"]


# --- retries outlast an outage; what still fails is kept --------------------------------------
#
# How each platform spaces its retries (n = 1, 2, ...): the Kafka broker waits backoffDelay * n
# (linear) or backoffDelay * 2^n (exponential) before retry n (eventing-kafka-broker,
# WebClientCloudEventSender.computeRetryPolicy); OpenFaaS Pro's queue-worker doubles from min_wait
# up to max_wait. scripts/local_router.py follows the Kafka broker (tests/test_local_router.py).

OUTAGE_SECONDS = 3600
#: The longest gap between two retries: a recovered provider is noticed within it.
MAX_GAP_SECONDS = 600


def kafka_waits(delivery: Document) -> list[float]:
    delay = iso_seconds(delivery["backoffDelay"])
    if delivery.get("backoffPolicy", "exponential") == "linear":
        return [delay * n for n in range(1, delivery["retry"] + 1)]
    return [delay * 2 ** n for n in range(1, delivery["retry"] + 1)]


def openfaas_waits(annotations_: Document) -> list[float]:
    low, high = go_seconds(annotations_["com.openfaas.retry.min_wait"]), go_seconds(annotations_["com.openfaas.retry.max_wait"])
    return [min(low * 2 ** (n - 1), high) for n in range(1, int(annotations_["com.openfaas.retry.attempts"]))]


def retry_problems(where: str, waits: list[float]) -> list[str]:
    problems = []
    if sum(waits) < OUTAGE_SECONDS:
        problems.append(f"{where}: retries end {sum(waits):g} s after the first failure, before an hour")
    if max(waits, default=0) > MAX_GAP_SECONDS:
        problems.append(f"{where}: {max(waits):g} s between two retries")
    return problems


def test_the_broker_retries_outlast_an_hour_long_outage(documents, stack):
    problems = retry_problems("broker", kafka_waits(broker_delivery(documents)))
    for name in DISPATCHERS:
        problems += retry_problems(f"stack.yml {name}", openfaas_waits(stack["functions"][name]["annotations"]))
    assert problems == []


def test_the_retry_check_catches_the_old_four_minute_schedule():
    old = {"retry": 7, "backoffPolicy": "exponential", "backoffDelay": "PT2S"}
    assert retry_problems("broker", kafka_waits(old)) == ["broker: retries end 508 s after the first failure, before an hour"]
    assert retry_problems("x", kafka_waits({**old, "retry": 12})) == ["x: 8192 s between two retries"]


def test_the_delivery_spec_names_only_fields_knative_knows(documents):
    """delivery is not checked by the CRD's schema (it keeps unknown fields): a misspelt field
    would be silently ignored."""
    known = {"retry", "backoffPolicy", "backoffDelay", "deadLetterSink", "timeout", "retryAfterMax"}
    deliveries = [broker_delivery(documents)] + [
        t["spec"]["delivery"] for t in of_kind(documents, ("eventing.knative.dev/v1", "Trigger")) if "delivery" in t["spec"]
    ]
    assert all(set(delivery) <= known for delivery in deliveries)


# --- database connections: the manifests' maximum fits the database ------------------------------
#
# Each replica keeps at most PUSH_DATABASE_POOL_SIZE + PUSH_DATABASE_MAX_OVERFLOW connections; a
# rollout may run the old and the new revision's replicas side by side (ROLLOUT); plus the Jobs
# (pushctl migrate, pushctl dead-letters). docs/deploy.md states the same formula and number.

STATED_MAX_CONNECTIONS = 500
ROLLOUT = 2
JOB_CONNECTIONS = 2
CODE_DEFAULT_POOL = 10


def pool_of(variables: dict[str, Any], config: dict[str, str]) -> int:
    merged = {**config, **{k: str(v) for k, v in variables.items()}}
    return int(merged.get("PUSH_DATABASE_POOL_SIZE") or CODE_DEFAULT_POOL) + int(merged.get("PUSH_DATABASE_MAX_OVERFLOW") or 0)


def most_connections(documents: Iterable[Document], stack: Document) -> dict[str, int]:
    (config,) = [g for g in kustomization()["configMapGenerator"] if g["name"] == "push-config"]
    shared = dict(literal.split("=", 1) for literal in config["literals"])
    knative = sum(
        int(annotations(s)["autoscaling.knative.dev/max-scale"]) * pool_of(env(s), shared)
        for name, s in services(documents).items() if name in FUNCTIONS
    )
    openfaas = sum(
        int(f["labels"]["com.openfaas.scale.max"]) * pool_of(f.get("environment", {}), {})
        for f in stack["functions"].values()
    )
    return {where: total * ROLLOUT + JOB_CONNECTIONS for where, total in (("knative", knative), ("openfaas", openfaas))}


def test_the_most_connections_the_manifests_open_fit_the_stated_max_connections(documents, stack):
    assert max(most_connections(documents, stack).values()) <= STATED_MAX_CONNECTIONS
    deploy = (REPO / "docs" / "deploy.md").read_text()
    assert f"max_connections` of at least {STATED_MAX_CONNECTIONS}" in deploy


def test_the_connection_check_counts_the_code_default_pool(documents, stack):
    """Without the pool sizes the shipped config sets, every replica keeps the code's 10."""
    knative = [copy.deepcopy(d) for d in documents]
    for service in services(knative).values():
        container(service)["env"] = [e for e in container(service)["env"] if e["name"] != "PUSH_DATABASE_POOL_SIZE"]
    assert most_connections(knative, stack)["knative"] == 47 * CODE_DEFAULT_POOL * ROLLOUT + JOB_CONNECTIONS


# --- who can reach what (network policies, public routes) --------------------------------------


def policies_for(documents: Iterable[Document], role: str, direction: str) -> list[Document]:
    """The NetworkPolicies that select the pods of ``role`` and govern ``direction``."""
    chosen = []
    for policy in of_kind(documents, ("networking.k8s.io/v1", "NetworkPolicy")):
        selector = policy["spec"]["podSelector"]
        labels = {"push.wikimedia.org/role": role}
        matches = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
            labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []) if e["operator"] == "In"
        )
        if matches and direction in policy["spec"].get("policyTypes", []):
            chosen.append(policy)
    return chosen


def ingress_sources(documents: Iterable[Document], role: str, port: int) -> set[str]:
    """Who may open ``port`` on a pod of ``role``: namespace names, or "anyone"."""
    sources: set[str] = set()
    for policy in policies_for(documents, role, "Ingress"):
        for rule in policy["spec"].get("ingress", []):
            if rule.get("ports") and port not in {p["port"] for p in rule["ports"]}:
                continue
            if not rule.get("from"):
                sources.add("anyone")
            for peer in rule.get("from", []):
                names = peer.get("namespaceSelector", {}).get("matchLabels", {})
                sources.add(names.get("kubernetes.io/metadata.name", "anyone"))
    return sources


def egress_ports(documents: Iterable[Document], role: str) -> set[Any]:
    ports: set[Any] = set()
    for policy in policies_for(documents, role, "Egress"):
        for rule in policy["spec"].get("egress", []):
            ports |= {p["port"] for p in rule.get("ports", [])} or {f"any port to {rule['to']}"}
    return ports


ROLES = {"subscribe": "api", "unsubscribe": "api", "cleanup-invalid-tokens": "cleanup"} | {d: "dispatcher" for d in DISPATCHERS}
NETWORK_LAYER = {"kourier-system", "knative-serving", "knative-eventing", "mediawiki"}


def test_everything_is_closed_unless_a_policy_opens_it(documents):
    (deny,) = [p for p in of_kind(documents, ("networking.k8s.io/v1", "NetworkPolicy")) if not p["spec"]["podSelector"]]
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not deny["spec"].get("ingress") and not deny["spec"].get("egress")


@pytest.mark.parametrize("function", FUNCTIONS)
def test_each_function_is_reachable_only_as_its_role_allows(documents, function):
    service = services(documents)[function]
    role = service["spec"]["template"]["metadata"]["labels"]["push.wikimedia.org/role"]
    assert role == ROLES[function]
    expected = {"anyone"} if role == "api" else NETWORK_LAYER
    assert ingress_sources(documents, role, 8012) == expected
    assert ingress_sources(documents, role, metrics_port(env(service))) == {"monitoring"}
    assert ingress_sources(documents, role, 8080) == set()  # only through queue-proxy


@pytest.mark.parametrize("role", ["api", "dispatcher", "cleanup"])
def test_functions_reach_only_dns_the_database_https_and_the_broker(documents, role):
    expected = {53, 3306} | ({443} if role != "cleanup" else set())
    ports = egress_ports(documents, role)
    broker = {p for p in ports if isinstance(p, str)}
    assert ports - broker == expected
    assert broker == ({"any port to [{'namespaceSelector': {'matchLabels': {'kubernetes.io/metadata.name': 'knative-eventing'}}}]"}
                      if role == "dispatcher" else set())


def test_the_reachability_check_catches_a_policy_open_to_all(documents):
    opened = copy.deepcopy(documents) + [{
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "oops"},
        "spec": {"podSelector": {"matchLabels": {"push.wikimedia.org/role": "dispatcher"}},
                 "policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{"ports": [{"port": 22}]}]},
    }]
    assert "anyone" in ingress_sources(opened, "dispatcher", 8012)
    assert 22 in egress_ports(opened, "dispatcher")


def test_openfaas_exposes_only_subscribe_and_unsubscribe():
    documents = [d for _, d in load_openfaas()]
    (ingress,) = of_kind(documents, ("networking.k8s.io/v1", "Ingress"))
    paths = {path["path"] for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]}
    assert paths == {"/function/subscribe", "/function/unsubscribe"}
    assert all(path["pathType"] == "Exact" for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"])
    (policy,) = of_kind(documents, ("networking.k8s.io/v1", "NetworkPolicy"))
    (selector,) = policy["spec"]["podSelector"]["matchExpressions"]
    assert set(selector["values"]) == set(FUNCTIONS)
    assert [p["namespaceSelector"]["matchLabels"] for r in policy["spec"]["ingress"] for p in r["from"]] == [
        {"kubernetes.io/metadata.name": "openfaas"}, {"kubernetes.io/metadata.name": "monitoring"}]


# --- the two platforms agree ----------------------------------------------------------------


def knative_secrets(service: Document) -> set[str]:
    names = {e["valueFrom"]["secretKeyRef"]["name"] for e in container(service).get("env", [])
             if "secretKeyRef" in e.get("valueFrom", {})}
    for volume in service["spec"]["template"]["spec"].get("volumes", []):
        names |= {s["secret"]["name"] for s in volume.get("projected", {}).get("sources", []) if "secret" in s}
    return names


@pytest.mark.parametrize("function", FUNCTIONS)
def test_openfaas_and_knative_mount_the_same_secrets(documents, stack, function):
    on_knative = knative_secrets(services(documents)[function]) - {"push-apps"}  # optional there
    assert set(stack["functions"][function].get("secrets", [])) == on_knative


@pytest.mark.parametrize("function", FUNCTIONS)
def test_openfaas_and_knative_scale_alike(documents, stack, function):
    knative_annotations = annotations(services(documents)[function])
    labels = stack["functions"][function]["labels"]
    assert labels["com.openfaas.scale.max"] == knative_annotations["autoscaling.knative.dev/max-scale"]
    assert labels["com.openfaas.scale.target"] == knative_annotations["autoscaling.knative.dev/target"]
    assert labels["com.openfaas.scale.zero"] == "true"


def test_openfaas_connectors_reach_the_right_functions(stack):
    functions = stack["functions"]
    for name in DISPATCHERS:
        assert functions[name]["annotations"]["topic"] == "push.notification.requested"
        assert functions[name]["environment"]["PUSH_CONNECTOR_EVENT_TYPE"] == NOTIFICATION_REQUESTED
        assert "/async-function/cleanup-invalid-tokens" in functions[name]["environment"]["K_SINK"]
    cleanup = functions["cleanup-invalid-tokens"]["annotations"]
    assert cleanup["topic"] == "cron-function" and len(cleanup["schedule"].split()) == 5


# --- OpenFaaS builds from a context of only what the image needs ------------------------------


def dockerignore_allowed() -> set[str]:
    """The top-level paths .dockerignore lets into a build context (it starts from ``*``)."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    return {line[1:].strip("/") for line in lines if line.startswith("!")}


def dockerfile_sources() -> set[str]:
    """The top-level paths the Dockerfile COPYs from the build context."""
    sources = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources |= {w.strip("/").split("/")[0] for w in words[1:-1] if not w.startswith("--")}
    return sources


def build_context_problems(stack: Document) -> list[str]:
    """faas-cli copies a ``lang: dockerfile`` function's handler folder into build/<function>/,
    then ``configuration.copy``'s paths: the handler must be the function's own folder, and the
    copies the Dockerfile and what it reads, never what .dockerignore keeps out (.venv/, .local/)."""
    copies = {path.removeprefix("./").strip("/") for path in stack.get("configuration", {}).get("copy", [])}
    allowed = dockerignore_allowed() | {".dockerignore"}
    problems = [f"configuration.copy: {path!r} is not something an image may use" for path in sorted(copies - allowed)]
    problems += [
        f"configuration.copy: the Dockerfile reads {path!r}, which is not copied"
        for path in sorted(({"Dockerfile", ".dockerignore"} | dockerfile_sources()) - copies)
    ]
    for name, function in stack["functions"].items():
        handler = Path(function.get("handler", "."))
        if function.get("lang") == "dockerfile" and handler != Path("functions") / name:
            problems.append(f"{name}: handler {function.get('handler')!r} is not functions/{name}")
    return problems


def test_openfaas_builds_each_function_from_only_what_its_image_needs(stack):
    assert build_context_problems(stack) == []


def test_the_build_context_check_catches_the_repository_as_handler(stack):
    whole = copy.deepcopy(stack)
    whole["functions"]["subscribe"]["handler"] = "."
    whole["configuration"]["copy"] = ["./Dockerfile", "./.local", "./shared"]
    assert sorted(build_context_problems(whole)) == [
        "configuration.copy: '.local' is not something an image may use",
        "configuration.copy: the Dockerfile reads '.dockerignore', which is not copied",
        "configuration.copy: the Dockerfile reads 'functions', which is not copied",
        "configuration.copy: the Dockerfile reads 'pyproject.toml', which is not copied",
        "configuration.copy: the Dockerfile reads 'requirements', which is not copied",
        "subscribe: handler '.' is not functions/subscribe",
    ]


# --- kustomize: one place for the parameters ------------------------------------------------


def resolve_field(document: Any, field_path: str) -> Any:
    """A kustomize replacement fieldPath (``a.b.[name=x].0.c``) in ``document``; KeyError if absent."""
    node = document
    for segment in re.findall(r"\[[^\]]*\]|[^.\[\]]+", field_path):
        if segment.startswith("[") and "=" not in segment:  # a map key with dots: [a.b/c]
            node = node[segment[1:-1]]
        elif segment.startswith("["):
            key, _, value = segment[1:-1].partition("=")
            matches = [item for item in node if isinstance(item, dict) and str(item.get(key)) == value]
            if not matches:
                raise KeyError(field_path)
            node = matches[0]
        elif isinstance(node, list):
            node = node[int(segment)]
        else:
            node = node[segment]
    return node


def selected(select: Document, document: Document) -> bool:
    """Whether a kustomize replacement's ``select`` (group, kind, name, labelSelector) picks it."""
    api_version, kind_ = kind(document)
    group = api_version.rpartition("/")[0]
    if select.get("kind") != kind_ or select.get("group", group) != group:
        return False
    if "name" in select and select["name"] != document["metadata"]["name"]:
        return False
    labels = document["metadata"].get("labels", {})
    for clause in filter(None, [c.strip() for c in re.split(r",(?![^(]*\))", select.get("labelSelector", ""))]):
        if " in " in clause:
            key, values = clause.split(" in ", 1)
            if labels.get(key.strip()) not in {v.strip() for v in values.strip("() ").split(",")}:
                return False
        else:
            key, value = clause.split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def test_parameter_replacements_land_on_the_values_they_replace(documents):
    """Each replacement in kustomization.yaml points at a field holding the default it replaces
    (a Secret's name, a namespace, the database's CIDR), and every Secret reference of every
    Service is covered by one."""
    spec = kustomization()
    defaults = {
        generator["name"]: dict(literal.split("=", 1) for literal in generator["literals"])
        for generator in spec["configMapGenerator"]
        if generator.get("options", {}).get("annotations", {}).get("config.kubernetes.io/local-config")
    }
    targeted: set[tuple[str, str]] = set()
    for replacement in spec["replacements"]:
        source = replacement["source"]
        key = source["fieldPath"].removeprefix("data.")
        for target in replacement["targets"]:
            chosen = [d for d in documents if selected(target["select"], d)]
            assert chosen, f"{key}: the select matches nothing"
            for document in chosen:
                for field_path in target["fieldPaths"]:
                    value = resolve_field(document, field_path)
                    assert value == defaults[source["name"]][key], (document["metadata"]["name"], field_path)
                    if kind(document) == SERVICE:
                        targeted.add((document["metadata"]["name"], value))
    references = {(name, secret) for name, s in services(documents).items() for secret in knative_secrets(s)}
    assert references == targeted


def kubectl() -> str | None:
    """kubectl on the PATH (a Debian package on the development machines), or the one `make
    tools` installs into the virtualenv where the machine has none."""
    for candidate in (shutil.which("kubectl"), str(Path(sys.executable).parent / "kubectl")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def kustomize() -> list[str]:
    found = kubectl()
    if found is None:
        message = "kubectl is not installed: `make tools` installs it"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return [found, "kustomize"]


def build(kustomize: list[str], folder: Path) -> list[Document]:
    result = subprocess.run([*kustomize, str(folder)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def with_components(tmp_path: Path, chosen: Iterable[str], edit: Any = None) -> Path:
    """A copy of knative/ whose kustomization lists exactly the ``chosen`` components."""
    overlay = tmp_path / "knative"
    shutil.copytree(KNATIVE, overlay)
    spec = kustomization()
    spec["components"] = list(chosen)
    if edit is not None:
        edit(spec)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return overlay


PROVIDER_COMPONENTS = [f"providers/{name.removeprefix('dispatch-')}" for name in DISPATCHERS]
#: Every subset of the providers, with and without the privacy delay; then the other options.
COMBINATIONS = [
    providers + delay
    for size in range(len(PROVIDER_COMPONENTS) + 1)
    for providers in map(list, itertools.combinations(PROVIDER_COMPONENTS, size))
    for delay in ([], ["privacy-delay"])
] + [PROVIDER_COMPONENTS + ["brokers/rabbitmq", "retry-after"]]


@pytest.mark.parametrize("chosen", COMBINATIONS, ids=lambda chosen: "+".join(chosen) or "no-components")
def test_every_combination_of_components_builds_and_validates(kustomize, schemas, tmp_path, chosen):
    built = build(kustomize, with_components(tmp_path, chosen))
    problems = [f"{d['kind']} {d['metadata']['name']}: {p}" for d in built for p in schema_problems(d, schemas)]
    assert problems == []
    deployed = set(services(built))
    wanted = {f"dispatch-{c.removeprefix('providers/')}" for c in chosen if c.startswith("providers/")}
    assert deployed == {"subscribe", "unsubscribe", "cleanup-invalid-tokens"} | wanted
    assert dangling_subscribers(built) == []
    assert {d["metadata"].get("namespace") for d in built if d["kind"] != "Namespace"} == {"push"}
    assert [d["metadata"]["name"] for d in built if d["kind"] == "Namespace"] == ["push"]
    assert "local-config" not in yaml.safe_dump_all(built)
    ticks = [d for d in built if d["kind"] == "PingSource" and d["metadata"]["name"] == "flush-pending"]
    assert len(ticks) == ("privacy-delay" in chosen)
    (broker,) = of_kind(built, ("eventing.knative.dev/v1", "Broker"))
    rabbit = "brokers/rabbitmq" in chosen
    assert broker["metadata"]["annotations"]["eventing.knative.dev/broker.class"] == ("RabbitMQBroker" if rabbit else "Kafka")
    assert ("retryAfterMax" in broker["spec"]["delivery"]) == ("retry-after" in chosen)
    config_maps = {d["metadata"]["name"] for d in built if d["kind"] == "ConfigMap"}
    assert ("push-kafka-broker-config" in config_maps) != rabbit


def test_the_kustomization_builds_with_the_parameters_applied(kustomize, tmp_path):
    def parameters(spec: Document) -> None:
        spec["namespace"] = "push-test"
        for generator in spec["configMapGenerator"]:
            generator["literals"] = [
                {"fcm-credentials-secret=push-fcm-credentials": "fcm-credentials-secret=other-fcm",
                 "echo-namespace=mediawiki": "echo-namespace=echo",
                 "database-cidr=10.0.0.0/8": "database-cidr=192.0.2.0/24"}.get(literal, literal)
                for literal in generator["literals"]
            ]

    built = build(kustomize, with_components(tmp_path, PROVIDER_COMPONENTS + ["privacy-delay"], parameters))
    assert {d["metadata"].get("namespace") for d in built if d["kind"] != "Namespace"} == {"push-test"}
    assert [d["metadata"]["name"] for d in built if d["kind"] == "Namespace"] == ["push-test"]
    built_services = services(built)
    assert container(built_services["dispatch-fcm"])["image"].startswith("registry.example.org/push-functions/dispatch-fcm:")
    assert "other-fcm" in knative_secrets(built_services["dispatch-fcm"])
    (config,) = [d for d in built if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("push-config")]
    assert config["data"]["PUSH_PRIVACY_DELAY"]
    assert container(built_services["subscribe"])["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    policies = yaml.safe_dump_all(of_kind(built, ("networking.k8s.io/v1", "NetworkPolicy")))
    assert "kubernetes.io/metadata.name: echo" in policies and "192.0.2.0/24" in policies


def test_the_database_url_is_read_from_its_mounted_secret_file(stack, tmp_path, monkeypatch):
    assert all("push-database-url" in f.get("secrets", []) for f in stack["functions"].values())
    from shared.db import database_url

    url = f"sqlite:///{tmp_path / 'from-secret.sqlite3'}"
    (tmp_path / "push-database-url").write_text(url + "\n")
    monkeypatch.delenv("PUSH_DATABASE_URL", raising=False)
    monkeypatch.setenv("PUSH_SECRETS_DIR", str(tmp_path))
    assert database_url() == url
