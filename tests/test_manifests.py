"""The deployment manifests (knative/, stack.yml), checked without a cluster.

Every document validates against the reference JSON Schemas in tests/manifest_schemas (public
data from the Knative CRDs and OpenFaaS's stack format; its README names their source and
version), chosen by its apiVersion and kind; stack.yml against
openfaas/stack_v1.json. Then the rules no schema checks, one test each, each with a companion
test showing its checker catches a bad document.
"""
from __future__ import annotations

import ast
import copy
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from shared.events import NOTIFICATION_REQUESTED, SUBSCRIPTION_INVALID
from shared.metrics import DEFAULT_PORT as DEFAULT_METRICS_PORT

REPO = Path(__file__).resolve().parent.parent
KNATIVE = REPO / "knative"
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
    """(resource files, other kustomize inputs) of the kustomizations under ``folder``."""
    resources, others = set(), set()
    for kustomization in folder.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        others.add(kustomization)
        for entry in spec.get("resources", []):
            resources.add((kustomization.parent / entry).resolve())
        for entry in spec.get("configurations", []):
            others.add((kustomization.parent / entry).resolve())
    return resources, others


def load_knative() -> list[tuple[str, Document]]:
    """(where, document) for every document of every resource file under knative/."""
    documents = []
    for path in sorted(KNATIVE.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.resolve() in kustomize_files(KNATIVE)[1]:
            continue
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document is not None:
                documents.append((f"{path.relative_to(REPO)}#{index}", document))
    return documents


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


def schema_problems(document: Document, schemas: Path) -> list[str]:
    """Why ``document`` does not validate against its schema (apiVersion + kind); [] if it does."""
    api_version, kind_ = kind(document)
    group, _, version = api_version.rpartition("/")
    path = schemas / group / f"{kind_.lower()}_{version}.json"
    if not group or not path.is_file():
        return [f"no schema for apiVersion {api_version!r} kind {kind_!r} (looked for {path})"]
    schema = json.loads(path.read_text())
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


def test_stack_yml_validates_against_the_openfaas_schema(stack, schemas):
    schema = json.loads((schemas / "openfaas" / "stack_v1.json").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(stack)]
    assert errors == []


def test_the_schema_check_catches_unknown_fields_and_kinds(knative, schemas):
    service = copy.deepcopy(services(d for _, d in knative)["subscribe"])
    service["spec"]["template"]["spec"]["containerConcurency"] = 10  # misspelt
    assert any("containerConcurency" in p for p in schema_problems(service, schemas))
    assert schema_problems({"apiVersion": "v1", "kind": "ConfigMap"}, schemas)


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
# constants of shared/events.py; the functions of shared/events.py that make an event
# (``{"type": CONSTANT, ...}``) are its makers; a function emits the types of the makers called,
# and of the ``"type": CONSTANT`` mappings written, in the shared modules its main.py imports
# (transitively). A new event type sent anywhere a function reaches needs a Trigger.


def event_type_constants(events_py: Path) -> dict[str, str]:
    """Module-level string constants of shared/events.py: name -> value."""
    constants = {}
    for node in ast.parse(events_py.read_text()).body:
        if (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        ):
            constants[node.targets[0].id] = node.value.value
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
    """The dispatchers' dead-token reports (shared/dispatch.py calls invalid_tokens_event) are
    found; importing shared/events.py, as cleanup-invalid-tokens does to read those reports, is
    not sending one."""
    assert set(EMITS) == set(FUNCTIONS)
    assert all(SUBSCRIPTION_INVALID in EMITS[name] for name in DISPATCHERS)
    assert EMITS["cleanup-invalid-tokens"] == EMITS["subscribe"] == set()


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


def test_the_broker_retries_with_exponential_backoff_and_a_dead_letter_sink(documents):
    (broker,) = of_kind(documents, ("eventing.knative.dev/v1", "Broker"))
    delivery = broker["spec"]["delivery"]
    assert delivery["retry"] >= 3 and delivery["backoffPolicy"] == "exponential"
    assert re.fullmatch(r"PT\d+(\.\d+)?S", delivery["backoffDelay"])
    assert delivery["deadLetterSink"]["ref"]["name"] in services(documents)


def test_the_daily_ping_goes_to_cleanup(documents):
    pings = [p for p in of_kind(documents, ("sources.knative.dev/v1", "PingSource")) if p["metadata"]["name"] == "cleanup-daily"]
    assert len(pings) == 1
    assert pings[0]["spec"]["sink"]["ref"]["name"] == "cleanup-invalid-tokens"
    assert len(pings[0]["spec"]["schedule"].split()) == 5


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
    assert all(p.exists() for p in resources)


# --- Knative settings the README asks for ---------------------------------------------------


def test_dispatchers_and_cleanup_are_cluster_local_and_the_api_public(documents):
    for name, service in services(documents).items():
        visibility = service["metadata"].get("labels", {}).get("networking.knative.dev/visibility")
        if name in ("subscribe", "unsubscribe"):
            assert visibility is None, name
        else:
            assert visibility == "cluster-local", name


def test_dispatcher_timeout_is_above_the_deadline_and_below_the_lease(documents):
    for name in DISPATCHERS:
        service = services(documents)[name]
        timeout = service["spec"]["template"]["spec"]["timeoutSeconds"]
        variables = env(service)
        assert int(variables["PUSH_DISPATCH_DEADLINE_SECONDS"]) < timeout < int(variables["PUSH_DELIVERY_LEASE_SECONDS"])


@pytest.mark.parametrize("function", FUNCTIONS)
def test_every_function_scales_to_zero_and_probes_readyz(documents, function):
    service = services(documents)[function]
    assert annotations(service)["autoscaling.knative.dev/min-scale"] == "0"
    assert container(service)["readinessProbe"]["httpGet"]["path"] == "/readyz"


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
    mounts = function.get("volumeMounts", [])
    problems += [f"{m['name']} is mounted at {m['mountPath']}, not {SECRETS_DIR}" for m in mounts if m["mountPath"] != SECRETS_DIR]
    problems += [f"{m['name']} is mounted writable" for m in mounts if not m.get("readOnly")]
    volumes = {v["name"]: v for v in service["spec"]["template"]["spec"].get("volumes", [])}
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


# --- shutdown: a dispatcher drains its events before the platform kills it --------------------


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


def drain_problems(documents: Iterable[Document], stack: Document) -> list[str]:
    """Dispatchers whose drain on shutdown is shorter than PUSH_DISPATCH_DEADLINE_SECONDS (an
    event in flight is cut off) or not shorter than the pod's terminationGracePeriodSeconds (the
    kubelet kills it first). Knative sets that grace period to the revision's timeoutSeconds;
    faas-netes and the OpenFaaS operator to write_timeout + 2 s (30 s without it)."""
    problems = []
    knative_services = services(documents)
    for name in DISPATCHERS:
        service = knative_services[name]
        environment = stack["functions"][name].get("environment", {})
        platforms = [
            ("knative", env(service), service["spec"]["template"]["spec"]["timeoutSeconds"]),
            ("stack.yml", environment, go_seconds(environment.get("write_timeout", "30s")) + 2),
        ]
        for where, variables, grace in platforms:
            deadline, drain = int(variables["PUSH_DISPATCH_DEADLINE_SECONDS"]), graceful_timeout(variables)
            if drain < deadline:
                problems.append(f"{where} {name}: drains {drain} s, less than the {deadline} s deadline")
            if drain >= grace:
                problems.append(f"{where} {name}: drains {drain} s, not less than the {grace:g} s grace period")
    return problems


def test_dispatchers_drain_for_the_deadline_within_the_grace_period(documents, stack):
    assert drain_problems(documents, stack) == []


def test_the_drain_check_catches_gunicorns_default_graceful_timeout(documents, stack):
    knative = [copy.deepcopy(d) for d in documents]
    service = services(knative)["dispatch-apns"]
    container(service)["env"] = [e for e in container(service)["env"] if e["name"] != "GUNICORN_CMD_ARGS"]
    openfaas = copy.deepcopy(stack)
    openfaas["functions"]["dispatch-fcm"]["environment"] = {
        k: v for k, v in stack["functions"]["dispatch-fcm"]["environment"].items() if k != "GUNICORN_CMD_ARGS"
    }
    openfaas["functions"]["dispatch-webpush"]["environment"] = {
        **stack["functions"]["dispatch-webpush"]["environment"], "write_timeout": "60s"
    }
    assert sorted(drain_problems(knative, openfaas)) == [
        "knative dispatch-apns: drains 30 s, less than the 60 s deadline",
        "stack.yml dispatch-fcm: drains 30 s, less than the 60 s deadline",
        "stack.yml dispatch-webpush: drains 75 s, not less than the 62 s grace period",
    ]


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
        if segment.startswith("["):
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


def selected(select: Document, service: Document) -> bool:
    if select.get("kind") != "Service" or select.get("group") != "serving.knative.dev":
        return False
    if "name" in select and select["name"] != service["metadata"]["name"]:
        return False
    labels = service["metadata"].get("labels", {})
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


def test_secret_name_replacements_land_on_the_secrets_they_name(documents):
    """Each replacement in kustomization.yaml points at a Secret reference holding the default
    name it replaces, and every Secret reference of every Service is covered by one."""
    kustomization = yaml.safe_load((KNATIVE / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "push-secret-names"]
    defaults = dict(literal.split("=", 1) for literal in generator["literals"])
    targeted: set[tuple[str, str]] = set()
    for replacement in kustomization["replacements"]:
        key = replacement["source"]["fieldPath"].removeprefix("data.")
        for target in replacement["targets"]:
            chosen = [s for s in services(documents).values() if selected(target["select"], s)]
            assert chosen, f"{key}: the select matches no Service"
            for service in chosen:
                for field_path in target["fieldPaths"]:
                    assert resolve_field(service, field_path) == defaults[key], (service["metadata"]["name"], field_path)
                    targeted.add((service["metadata"]["name"], resolve_field(service, field_path)))
    references = {(name, secret) for name, s in services(documents).items() for secret in knative_secrets(s)}
    assert references == targeted


@pytest.fixture(scope="module")
def kustomize() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.skip("neither kustomize nor kubectl is installed")


def test_the_kustomization_builds_with_the_parameters_applied(kustomize, tmp_path):
    overlay = tmp_path / "knative"
    shutil.copytree(KNATIVE, overlay)
    text = (overlay / "kustomization.yaml").read_text()
    text = text.replace("namespace: push\n", "namespace: push-test\n")
    text = text.replace("fcm-credentials-secret=push-fcm-credentials", "fcm-credentials-secret=other-fcm")
    text = text.replace("# components:\n#   - privacy-delay", "components:\n  - privacy-delay")
    (overlay / "kustomization.yaml").write_text(text)
    result = subprocess.run([*kustomize, str(overlay)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert {d["metadata"].get("namespace") for d in built} == {"push-test"}
    assert "push-secret-names" not in result.stdout, "the local-config parameters must not be deployed"
    built_services = services(built)
    assert container(built_services["dispatch-fcm"])["image"].startswith("registry.example.org/push-functions/dispatch-fcm:")
    assert "other-fcm" in knative_secrets(built_services["dispatch-fcm"])
    (config,) = [d for d in built if d["kind"] == "ConfigMap"]
    assert config["data"]["PUSH_PRIVACY_DELAY"]
    assert container(built_services["subscribe"])["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert len([d for d in built if d["kind"] == "PingSource"]) == 1 + len(DISPATCHERS)


def test_the_database_url_is_read_from_its_mounted_secret_file(stack, tmp_path, monkeypatch):
    assert all("push-database-url" in f.get("secrets", []) for f in stack["functions"].values())
    from shared.db import database_url

    url = f"sqlite:///{tmp_path / 'from-secret.sqlite3'}"
    (tmp_path / "push-database-url").write_text(url + "\n")
    monkeypatch.delenv("PUSH_DATABASE_URL", raising=False)
    monkeypatch.setenv("PUSH_SECRETS_DIR", str(tmp_path))
    assert database_url() == url
