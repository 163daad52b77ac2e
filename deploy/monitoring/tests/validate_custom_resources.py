"""Validates the Prometheus Operator resources (ServiceMonitor,
PrometheusRule) of rendered manifests against the operator's own schemas.

kubernetes-validate knows only the built-in kinds and lets any other kind
pass with a warning, so the custom resources are checked here instead, with
the models that cloudcoil-models-prometheus-operator generates from the
operator's CRDs (types, required fields, patterns such as durations). Those
models ignore fields they do not know, where the API server's strict field
validation refuses them, so every resource must also come back unchanged
from a round trip through its model: a misspelt or misplaced field is
reported with its path.

    python validate_custom_resources.py RENDERED.yaml...

Exits 1 on any invalid resource, or when a file holds none to check.
"""

import sys

import yaml
from cloudcoil.models.prometheus_operator import v1
from pydantic import ValidationError

GROUP = "monitoring.coreos.com/"
MODELS = {
    "monitoring.coreos.com/v1": {
        "ServiceMonitor": v1.ServiceMonitor,
        "PrometheusRule": v1.PrometheusRule,
        "PodMonitor": v1.PodMonitor,
    },
}


def differences(given, kept, path=""):
    """Paths where `kept` (the round trip) lost or changed part of `given`."""
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            where = f"{path}.{key}" if path else key
            if key not in kept:
                yield f"{where}: not a field of the schema"
            else:
                yield from differences(value, kept[key], where)
    elif isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        for index, (a, b) in enumerate(zip(given, kept)):
            yield from differences(a, b, f"{path}[{index}]")
    elif given != kept:
        yield f"{path}: {given!r} reads back as {kept!r}"


def check(resource):
    """Problems with one resource; None when it is not a custom resource of
    the operator's group."""
    api_version = resource.get("apiVersion", "")
    if not api_version.startswith(GROUP):
        return None
    kind = resource.get("kind")
    model = MODELS.get(api_version, {}).get(kind)
    if model is None:
        return [f"no schema here for {api_version} {kind}"]
    try:
        parsed = model.model_validate(resource)
    except ValidationError as error:
        return [
            ".".join(str(part) for part in problem["loc"]) + ": " + problem["msg"]
            for problem in error.errors()
        ]
    kept = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return list(differences(resource, kept))


def main(paths):
    failed = False
    for path in paths:
        with open(path, encoding="utf-8") as file:
            resources = [doc for doc in yaml.safe_load_all(file) if doc]
        checked = 0
        for resource in resources:
            problems = check(resource)
            if problems is None:
                continue
            checked += 1
            name = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
            if problems:
                failed = True
                for problem in problems:
                    print(f"ERROR {path}: {name}: {problem}")
            else:
                print(f"INFO {path}: {name} is valid")
        if checked == 0:
            failed = True
            print(f"ERROR {path}: no {GROUP[:-1]} resource in it")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
