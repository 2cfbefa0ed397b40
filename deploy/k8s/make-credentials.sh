#!/bin/bash
# Writes deploy/k8s/credentials.json (random secrets, mode 0600, git-ignored) for the kustomize
# secretGenerator, once; `kubectl apply -k deploy/k8s` turns it into the Secret remote-mvc-credentials.
set -euo pipefail
out="$(cd "$(dirname "$0")" && pwd)/credentials.json"
PY="${PY:-.venv/bin/python}"
if [ -s "$out" ]; then echo "$out exists: kept"; exit 0; fi
"$PY" -c "import sys; from remote_mvc import generate_credentials; generate_credentials(sys.argv[1])" "$out"
echo "wrote $out (identities controller, admin, service, viewer, gateway)"
