#!/usr/bin/env python3
"""Writes the committed seeds of the `admission` fuzz target (fuzz/seeds/admission/).

An input is a flags byte, `now_ms` (8 bytes little-endian), then the payload (see
fuzz_targets/admission.rs). Envelopes reuse the signature of the wire test vector
(schemas/tests/vectors.json, RFC 8032 test 1 key), which covers only the body, so their `key_id`
can name any key the target registers; signed-here seeds carry a job body the target signs.
Standard library only: `python3 fuzz/seeds/make_admission.py`.
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = json.load(open(os.path.join(HERE, "../../schemas/tests/vectors.json")))
CREATED = VECTORS["job_json"]["created_at_ms"]
BODY = bytes.fromhex(VECTORS["body_hex"])
SIGNATURE = bytes.fromhex(VECTORS["signature_hex"])
KEY_IDS = ["acme-1", "acme-window", "acme-future", "acme-old", "acme-revoked", "beta-1",
           "acme-other", "nobody"]
SUBJECT_OWN = 3  # the job's own model


def pack(value):
    """The MessagePack subset the strict decoder reads (timestamps as uint64, like clients)."""
    if isinstance(value, bool):
        return b"\xc3" if value else b"\xc2"
    if isinstance(value, int):
        if value < 128:
            return bytes([value])
        return b"\xcf" + struct.pack(">Q", value)
    if isinstance(value, str):
        raw = value.encode()
        assert len(raw) < 256
        return (bytes([0xA0 | len(raw)]) if len(raw) < 32 else b"\xd9" + bytes([len(raw)])) + raw
    if isinstance(value, bytes):
        assert len(value) < 256
        return b"\xc4" + bytes([len(value)]) + value
    if isinstance(value, list):
        assert len(value) < 16
        return bytes([0x90 | len(value)]) + b"".join(pack(v) for v in value)
    if isinstance(value, dict):
        assert len(value) < 16
        return bytes([0x80 | len(value)]) + b"".join(pack(k) + pack(v) for k, v in value.items())
    raise TypeError(value)


def job(**changes):
    fields = {
        "job_id": "job-0001",
        "tenant": "acme",
        "model": "all-minilm-l6-v2",
        "task": {"kind": "embed", "inputs": ["Hello, world!", "Fleet embeds text."],
                 "normalize": True, "truncate": True},
        "priority": 0,
        "created_at_ms": CREATED,
        "deadline_ms": CREATED + 60_000,
        "meta": {"source": "wire-spec"},
    }
    fields.update(changes)
    return pack(fields)


def envelope(key_id="acme-1", v=1):
    return pack({"v": v, "key_id": key_id, "signature": SIGNATURE, "body": BODY})


def seed(name, payload, signed_by=None, subject=0, now=CREATED + 1_000, built=False):
    flags = subject << 1
    if signed_by is not None:
        flags |= 1 | KEY_IDS.index(signed_by) << 3
    if built:
        flags |= 1 << 6
    with open(os.path.join(HERE, "admission", name), "wb") as out:
        out.write(bytes([flags]) + struct.pack("<Q", now) + payload)


assert job() == BODY, "the seed encoder must reproduce the signed vector body"
os.makedirs(os.path.join(HERE, "admission"), exist_ok=True)
# Received envelopes: admitted, then refused at each step a key id, subject or clock decides.
seed("vector", envelope())
seed("vector_window_key", envelope("acme-window"))
seed("vector_own_subject", envelope(), subject=SUBJECT_OWN)
seed("refused_revoked_key", envelope("acme-revoked"))
seed("refused_key_not_yet_valid", envelope("acme-future"))
seed("refused_key_expired", envelope("acme-old"))
seed("refused_other_tenants_key", envelope("beta-1"))
seed("refused_bad_signature", envelope("acme-other"))
seed("refused_unknown_key", envelope("nobody"))
seed("refused_version", envelope(v=2))
seed("refused_model_not_served", envelope(), subject=2)
seed("refused_other_subject", envelope(), subject=1)
seed("refused_expired", envelope(), now=CREATED + 61_000)
seed("refused_too_early", envelope(), now=CREATED - 31_000)
# Job bodies signed by the target: admitted, then refused by each check after the signature.
seed("signed_vector", BODY, signed_by="acme-1")
seed("signed_beta_any_model", job(tenant="beta", model="e5-small"), signed_by="beta-1",
     subject=SUBJECT_OWN)
seed("signed_refused_model_right", job(model="e5-small"), signed_by="acme-1", subject=SUBJECT_OWN)
seed("signed_refused_no_inputs", job(task={"kind": "embed", "inputs": []}), signed_by="acme-1")
seed("signed_refused_many_inputs", job(task={"kind": "embed", "inputs": ["a"] * 5}),
     signed_by="acme-1")
seed("signed_refused_long_input", job(task={"kind": "embed", "inputs": ["x" * 65]}),
     signed_by="acme-1")
seed("signed_refused_name", job(job_id="job 1"), signed_by="acme-1")
seed("signed_refused_future", job(created_at_ms=CREATED + 40_000), signed_by="acme-1")
seed("signed_refused_after_key_window", job(created_at_ms=CREATED + 6_000),
     signed_by="acme-window")
# Jobs built from choices (the first choice of each is the valid one): admitted, then beta's.
seed("built_first_choices", b"", signed_by="acme-1", built=True)
seed("built_beta", bytes([0, 1, 1, 1]), signed_by="beta-1", subject=1, built=True)
seed("signed_refused_garbage_body", b"\x81\xa1x\xc0", signed_by="acme-1")
