"""The deployment manifests (knative/, stack.yml), checked without a cluster.

Every document validates against the reference JSON Schemas in ../shared/schemas (beside this
repository, as CI clones it), chosen by its apiVersion and kind; stack.yml against
openfaas/stack_v1.json. Then the rules no schema checks, one test each, each with a companion
test showing its checker catches a bad document.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from shared.events import NOTIFICATION_REQUESTED, SUBSCRIPTION_INVALID

REPO = Path(__file__).resolve().parent.parent
KNATIVE = REPO / "knative"
STACK = REPO / "stack.yml"
SCHEMAS = (REPO.parent / "shared" / "schemas").resolve()
FUNCTIONS = sorted(p.name for p in (REPO / "functions").iterdir() if (p / "main.py").exists())
SERVICE = ("serving.knative.dev/v1", "Service")
DISPATCHERS = [f for f in FUNCTIONS if f.startswith("dispatch-")]
#: The event types each function sends (shared/dispatch.py: dead-token reports).
EMITS = {name: {SUBSCRIPTION_INVALID} for name in DISPATCHERS}
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
            f"the reference schemas are missing: expected {SCHEMAS} (the shared/schemas folder "
            "of the repository CI clones beside this one, as ../shared)",
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


def trigger_types(documents: list[Document]) -> dict[str, set[str]]:
    """Event type -> the Services a Trigger delivers it to."""
    routes: dict[str, set[str]] = {}
    for trigger in of_kind(documents, ("eventing.knative.dev/v1", "Trigger")):
        event_type = trigger["spec"].get("filter", {}).get("attributes", {}).get("type")
        routes.setdefault(event_type, set()).add(trigger["spec"]["subscriber"]["ref"]["name"])
    return routes


def unrouted_events(documents: list[Document]) -> list[str]:
    routes = trigger_types(documents)
    problems = [
        f"{function} emits {event_type}, which no Trigger delivers"
        for function, types in EMITS.items() for event_type in types if not routes.get(event_type)
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
def test_every_function_scales_to_zero_reads_secrets_from_files_and_probes_readyz(documents, function):
    service = services(documents)[function]
    assert annotations(service)["autoscaling.knative.dev/min-scale"] == "0"
    assert container(service)["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert env(service)["PUSH_DATABASE_URL"]["secretKeyRef"]["name"]
    assert env(service)["PUSH_SECRETS_DIR"] == "/var/openfaas/secrets"
    mounts = container(service).get("volumeMounts", [])
    assert all(m["mountPath"] == "/var/openfaas/secrets" and m.get("readOnly") for m in mounts)


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


def test_the_database_url_can_come_from_its_openfaas_secret_file(stack, tmp_path, monkeypatch):
    assert all("push-database-url" in f.get("secrets", []) for f in stack["functions"].values())
    from shared.db import database_url

    url = f"sqlite:///{tmp_path / 'from-secret.sqlite3'}"
    (tmp_path / "push-database-url").write_text(url + "\n")
    monkeypatch.delenv("PUSH_DATABASE_URL", raising=False)
    monkeypatch.setenv("PUSH_SECRETS_DIR", str(tmp_path))
    assert database_url() == url
