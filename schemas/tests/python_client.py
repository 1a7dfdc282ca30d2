"""A Fleet client written from WIRE.md alone: reproduces the committed test vectors.

Run: python3 -m pip install msgpack cryptography && python3 schemas/tests/python_client.py
"""
import json
import pathlib

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

vectors = json.loads((pathlib.Path(__file__).parent / "vectors.json").read_text())
job = vectors["job_json"]
order = ["job_id", "tenant", "model", "task", "priority", "created_at_ms", "deadline_ms", "meta"]
task_order = ["kind", "inputs", "normalize", "truncate"]
ordered = {k: job[k] for k in order}
ordered["task"] = {k: job["task"][k] for k in task_order}
body = msgpack.packb(ordered, use_bin_type=True)
assert body.hex() == vectors["body_hex"], "body differs"

key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vectors["secret_key"]))
public = key.public_key().public_bytes_raw().hex()
assert public == vectors["public_key"], "public key differs"
signature = key.sign(body)
assert signature.hex() == vectors["signature_hex"], "signature differs"

envelope = msgpack.packb(
    {"v": 1, "key_id": vectors["key_id"], "signature": signature, "body": body}, use_bin_type=True
)
assert envelope.hex() == vectors["envelope_hex"], "envelope differs"
print("python client reproduces body, signature and envelope: ok")
