#!/usr/bin/env python3
"""Schema check of rendered Kubernetes manifests (ops/check-k8s.sh runs it).

    check.py KUBERNETES_VERSION RENDERED.yaml [...]

Every document is checked against its schema: built-in kinds against the Kubernetes OpenAPI
schemas bundled in the kubernetes-validate package, strict (an unknown field fails, as with
`kubectl apply --validate=strict`); KEDA's ScaledObject against the vendored CRD schema
(schemas/, made strict by schemas/crd-to-jsonschema.py). A kind with no schema fails too.
Prints one line per document and the counts; exits 1 on any failure.
"""
import json
import os
import sys

import jsonschema
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
# The nats-jetstream scaler's trigger metadata (a map of strings to the CRD): its keys and which
# must be integers, from KEDA's pkg/scalers/nats_jetstream_scaler.go (same commit as schemas/).
JETSTREAM_KEYS = {"account", "accountID", "stream", "consumer", "lagThreshold",
                  "activationLagThreshold", "useHttps", "natsServerMonitoringEndpoint"}
JETSTREAM_REQUIRED = {"stream", "consumer", "natsServerMonitoringEndpoint"}
JETSTREAM_INTS = {"lagThreshold", "activationLagThreshold"}
CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject-v1alpha1.json",
}


def check(doc, version):
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRDS:
        with open(os.path.join(HERE, "schemas", CRDS[key])) as f:
            schema = json.load(f)
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
        problems = [f"{'.'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors]
        for i, trigger in enumerate(doc.get("spec", {}).get("triggers", [])):
            if trigger.get("type") != "nats-jetstream":
                continue
            meta = trigger.get("metadata", {})
            where = f"spec.triggers.{i}.metadata"
            problems += [f"{where}.{k}: not a nats-jetstream setting" for k in sorted(set(meta) - JETSTREAM_KEYS)]
            problems += [f"{where}: {k} is required" for k in sorted(JETSTREAM_REQUIRED - set(meta))]
            if not ({"account", "accountID"} & set(meta)):
                problems.append(f"{where}: account or accountID is required")
            problems += [f"{where}.{k}: {meta[k]!r} is not an integer" for k in sorted(JETSTREAM_INTS & set(meta))
                         if not str(meta[k]).isdigit()]
        return problems
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path)) or '(root)'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"no schema for {key[0]} {key[1]}: {e}"]
    return []


def main():
    version, files = sys.argv[1], sys.argv[2:]
    passed = failed = 0
    for path in files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        if not docs:
            print(f"FAIL {path}: no documents")
            failed += 1
        for doc in docs:
            name = f"{os.path.basename(path)}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            problems = check(doc, version)
            if problems:
                failed += 1
                print(f"FAIL {name}")
                for p in problems:
                    print(f"     {p}")
            else:
                passed += 1
                print(f"ok   {name}")
    print(f"{passed} passed; {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
