#!/usr/bin/env bash
# Regenerates fixtures/minilm_reference.json: the embeddings sentence-transformers (PyTorch, CPU,
# float32) gives for all-MiniLM-L6-v2, which model/tests/reference.rs and the GPU check compare
# Fleet's model against. The texts are the ones already in the fixture (corpus samples and edge
# cases), so a rerun changes only the numbers; pass another JSON list of strings to change them.
# PyTorch goes into a throwaway venv (default /tmp/fleet-st-venv), never into the project. Not
# part of CI: the fixture is committed.
# Usage: ops/make-reference.sh [texts.json]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${FLEET_ST_VENV:-/tmp/fleet-st-venv}
fixture="$root/fixtures/minilm_reference.json"
model="$root/models/all-MiniLM-L6-v2"
texts=${1:-}
"$root/ops/fetch-model.sh"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import sentence_transformers" 2>/dev/null; then
  python3 -m venv "$venv"
  # torch without its CUDA dependencies (gigabytes, unused on CPU), then the rest.
  "$venv/bin/pip" install --quiet --no-deps torch
  "$venv/bin/pip" install --quiet sentence-transformers filelock typing-extensions sympy networkx jinja2 fsspec
fi
"$venv/bin/python" - "$model" "$fixture" "$texts" <<'PY'
import json, os, sys

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

model_dir, fixture, texts_file = sys.argv[1], sys.argv[2], sys.argv[3]
source = texts_file or fixture
with open(source, encoding="utf-8") as f:
    data = json.load(f)
texts = data if isinstance(data, list) else [item["text"] for item in data["items"]]
if not all(isinstance(t, str) for t in texts):
    sys.exit(f"{source}: expected a list of strings or a fixture with items[].text")

model = SentenceTransformer(model_dir, device="cpu")
max_len = 256
model.max_seq_length = max_len
vectors = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
items = []
for text, vector in zip(texts, vectors):
    # Token count as the model sees it: special tokens included, after truncation.
    tokens = len(model.tokenizer(text, truncation=True, max_length=max_len)["input_ids"])
    items.append({"text": text, "tokens": tokens, "embedding": [float(x) for x in vector]})
out = {
    "model": "sentence-transformers/all-MiniLM-L6-v2",
    "producer": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}, CPU, float32",
    "pooling": "mean over attention mask, then L2 normalisation",
    "max_seq_length": max_len,
    "items": items,
}
tmp = fixture + ".partial"
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)
os.replace(tmp, fixture)
print(f"wrote {len(items)} embeddings to {fixture}")
PY
