#!/usr/bin/env python3
"""Turns a CustomResourceDefinition's openAPIV3Schema into a strict JSON schema file.

    crd-to-jsonschema.py CRD.yaml VERSION OUT.json

Strict as `kubectl apply --validate=strict` is: every object that lists its properties gets
`additionalProperties: false` unless it keeps unknown fields (x-kubernetes-preserve-unknown-fields)
or says otherwise, so a misspelled field fails. Used once to vendor KEDA's CRDs
(keda-scaledobject-v1alpha1.json, from
github.com/kedacore/keda config/crd/bases at the commit recorded in each file's $comment);
run it again to follow a newer KEDA.
"""
import json
import sys

import yaml


def strict(node):
    if isinstance(node, dict):
        for value in node.values():
            strict(value)
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


def main():
    crd_path, version, out = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    spec = crd["spec"]
    [ver] = [v for v in spec["versions"] if v["name"] == version]
    schema = strict(ver["schema"]["openAPIV3Schema"])
    # The API server fills in metadata's schema (ObjectMeta); keep names and labels checked.
    schema["properties"]["metadata"] = {"type": "object"}
    schema["properties"]["apiVersion"] = {"enum": [f"{spec['group']}/{version}"]}
    schema["properties"]["kind"] = {"enum": [spec["names"]["kind"]]}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "spec"})
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["$comment"] = sys.argv[4] if len(sys.argv) > 4 else f"from {crd_path}"
    with open(out, "w") as f:
        json.dump(schema, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
