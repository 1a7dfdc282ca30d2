"""Unit tests: the test vectors of schemas/tests/vectors.json, strict encoding, key files,
answers, the bulk job ids and JSON as serde_json writes it. No network."""
import json
import pathlib

import msgpack
import pytest

import fleet_client
from fleet_client import bulk, wire

REPO = pathlib.Path(__file__).resolve().parents[3]
VECTORS = json.loads((REPO / "schemas" / "tests" / "vectors.json").read_text())


def vector_key():
    return wire.TenantKey.from_hex(VECTORS["job_json"]["tenant"], VECTORS["key_id"], VECTORS["secret_key"])


def vector_job():
    job = VECTORS["job_json"]
    return wire.embed_job(
        job["tenant"],
        job["model"],
        job["task"]["inputs"],
        job_id=job["job_id"],
        created_at_ms=job["created_at_ms"],
        deadline_ms=job["deadline_ms"],
        priority=job["priority"],
        normalize=job["task"]["normalize"],
        truncate=job["task"]["truncate"],
        meta=job["meta"],
    )


def test_vectors_body_signature_envelope():
    key = vector_key()
    assert key.public_key_hex() == VECTORS["public_key"]
    body = wire.encode_job(vector_job())
    assert body.hex() == VECTORS["body_hex"]
    signature = key.sign(body)
    assert signature.hex() == VECTORS["signature_hex"]
    assert wire.encode_envelope(key.key_id, signature, body).hex() == VECTORS["envelope_hex"]
    assert wire.sign_job(key, vector_job()).hex() == VECTORS["envelope_hex"]


def test_envelope_is_strict_messagepack():
    envelope = msgpack.unpackb(wire.sign_job(vector_key(), vector_job()), raw=False)
    assert list(envelope) == ["v", "key_id", "signature", "body"]
    assert envelope["v"] == 1 and isinstance(envelope["key_id"], str)
    # bin fields are bin (bytes), not str and not arrays of byte values.
    assert isinstance(envelope["signature"], bytes) and len(envelope["signature"]) == 64
    assert isinstance(envelope["body"], bytes)
    job = msgpack.unpackb(envelope["body"], raw=False)
    assert all(isinstance(k, str) for k in job) and all(isinstance(k, str) for k in job["task"])
    assert set(job) <= {"job_id", "tenant", "model", "task", "priority", "created_at_ms", "deadline_ms", "meta"}
    assert all(isinstance(text, str) for text in job["task"]["inputs"])
    assert job["task"]["normalize"] is True and job["task"]["truncate"] is True


def test_job_defaults_and_meta_left_out_when_empty():
    job = wire.embed_job("acme", "all-minilm-l6-v2", ["a"], created_at_ms=5)
    assert list(job) == ["job_id", "tenant", "model", "task", "priority", "created_at_ms", "deadline_ms"]
    assert job["deadline_ms"] is None and job["priority"] == 0
    assert len(job["job_id"]) == 32
    body = msgpack.unpackb(wire.encode_job(job), raw=False)
    assert body["deadline_ms"] is None and "meta" not in body


@pytest.mark.parametrize(
    "change",
    [
        {"inputs": "one string"},
        {"inputs": [b"bytes"]},
        {"inputs": [1]},
        {"inputs": []},
        {"inputs": ["\ud800"]},
        {"tenant": "a.b"},
        {"tenant": ""},
        {"model": "x" * 65},
        {"job_id": "has space"},
        {"priority": 256},
        {"priority": -1},
        {"priority": True},
        {"created_at_ms": 1.5},
        {"created_at_ms": 1 << 64},
        {"deadline_ms": -1},
        {"normalize": 1},
        {"truncate": None},
        {"meta": {"k": 1}},
        {"meta": {1: "v"}},
    ],
)
def test_invalid_jobs_are_refused_before_sending(change):
    args = {"tenant": "acme", "model": "all-minilm-l6-v2", "inputs": ["a"]}
    args.update(change)
    with pytest.raises(ValueError):
        wire.embed_job(args.pop("tenant"), args.pop("model"), args.pop("inputs"), **args)


def test_sign_job_refuses_another_tenant():
    job = wire.embed_job("other", "all-minilm-l6-v2", ["a"])
    with pytest.raises(ValueError):
        wire.sign_job(vector_key(), job)


def test_key_file(tmp_path):
    path = tmp_path / "key.toml"
    path.write_text(f'tenant = "acme"\nkey_id = "acme-1"\nsecret_key = "{VECTORS["secret_key"]}"\n')
    key = wire.TenantKey.load(path)
    assert (key.tenant, key.key_id, key.public_key_hex()) == ("acme", "acme-1", VECTORS["public_key"])
    assert VECTORS["secret_key"] not in repr(key)
    path.write_text(path.read_text() + 'extra = "x"\n')
    with pytest.raises(fleet_client.FleetError, match="unknown keys"):
        wire.TenantKey.load(path)
    path.write_text('tenant = "acme"\nkey_id = "acme-1"\nsecret_key = "abcd"\n')
    with pytest.raises(fleet_client.FleetError, match="64 hex"):
        wire.TenantKey.load(path)
    with pytest.raises(fleet_client.FleetError, match="cannot read"):
        wire.TenantKey.load(tmp_path / "missing.toml")


def test_subjects():
    assert wire.infer_subject("m") == "fleet.infer.m"
    assert wire.submit_subject("m") == "fleet.submit.m"
    assert wire.inbox_prefix("acme") == "_INBOX.acme"
    assert wire.direct_get_subject("acme", "j1") == "$JS.API.DIRECT.GET.FLEET_RESULTS.fleet.results.acme.j1"
    with pytest.raises(ValueError):
        wire.direct_get_subject("acme", "a.>")


def test_answers_are_read_leniently_and_refusals_raise():
    ok = msgpack.packb(
        {
            "job_id": "j",
            "tenant": "acme",
            "model": "m",
            "status": "ok",
            "output": {"kind": "embeddings", "dims": 2, "vectors": [[0.5, 0.25]]},
            "error": None,
            "worker": "w",
            "timings": {"queue_ms": 1, "inference_ms": 2},
            "a_new_key": [1, 2],
        }
    )
    result = wire.decode_result(ok)
    assert result.ok and result.vectors == [[0.5, 0.25]] and result.dims == 2 and result.inference_ms == 2
    assert result.raise_for_status() is result
    rejected = wire.decode_result(
        msgpack.packb({"job_id": "j", "tenant": "acme", "model": "m", "status": "rejected", "output": None,
                       "error": {"code": "too_large", "message": "input 0 is 40000 bytes"}, "worker": "d",
                       "timings": {"queue_ms": 0, "inference_ms": 0}})
    )
    with pytest.raises(fleet_client.FleetRefused) as refused:
        rejected.raise_for_status()
    assert refused.value.code == "too_large" and "40000" in refused.value.message
    failed = wire.decode_result(msgpack.packb({"status": "failed", "error": {"code": "input_too_long", "message": ""}}))
    with pytest.raises(fleet_client.FleetFailed):
        failed.raise_for_status()
    reply = wire.decode_submit_reply(msgpack.packb({"status": "accepted", "job_id": "j", "stream_seq": 7, "duplicate": False, "error": None}))
    assert reply.accepted and reply.stream_seq == 7
    with pytest.raises(fleet_client.FleetError):
        wire.decode_result(b"\x93\x01\x02\x03")


def test_to_json_writes_as_serde_json():
    assert bulk.to_json({"status": "ok", "id": 7, "vector": [0.1, -0.5, 1.0]}) == '{"id":7,"status":"ok","vector":[0.1,-0.5,1.0]}'
    # zmij (serde_json's float writer): fixed notation for decimal exponents -5..=15, else
    # a shortest mantissa with an unpadded, signed exponent.
    assert bulk.to_json(1.5e-05) == "0.000015"
    assert bulk.to_json(-1.2345e-05) == "-0.000012345"
    assert bulk.to_json(0.0001) == "0.0001"
    assert bulk.to_json(1e-07) == "1e-7"
    assert bulk.to_json(-2.5e-10) == "-2.5e-10"
    assert bulk.to_json(1e16) == "1e+16"
    assert bulk.to_json(123456789012345.0) == "123456789012345.0"
    assert bulk.to_json(-0.0) == "-0.0"
    assert bulk.to_json("a\"b\\c\n\x01é") == '"a\\"b\\\\c\\n\\u0001é"'
    assert bulk.to_json({"b": [1, None, True], "a": "x"}) == '{"a":"x","b":[1,null,true]}'


def test_job_ids_are_content_derived():
    rows = [(1, "first"), ("two", "second")]
    first = bulk.job_id_for("all-minilm-l6-v2", 0, rows)
    assert len(first) == 32 and int(first, 16) >= 0
    assert bulk.job_id_for("all-minilm-l6-v2", 0, rows) == first
    assert bulk.job_id_for("all-minilm-l6-v2", 1, rows) != first
    assert bulk.job_id_for("other", 0, rows) != first
    assert bulk.job_id_for("all-minilm-l6-v2", 0, [(1, "firs"), ("ttwo", "second")]) != first
    # The same bytes as the Rust derivation (client/src/bulk.rs), spelled out.
    import hashlib

    digest = hashlib.sha256(b"all-minilm-l6-v2" + (0).to_bytes(8, "big"))
    for part in (b"1", b"first", b'"two"', b"second"):
        digest.update(len(part).to_bytes(8, "big") + part)
    assert first == digest.hexdigest()[:32]


def test_resume_point_cuts_a_torn_line_and_refuses_a_foreign_file(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id":1,"status":"ok","vector":[]}\n{"id":2,"status":"ok","vector":[]}\n{"id":3,"sta')
    assert bulk.resume_point(out) == 2
    assert out.read_text().endswith("[]}\n")
    assert bulk.resume_point(tmp_path / "none.jsonl") == 0
    out.write_text('{"id":1,"text":"not an output"}\n')
    with pytest.raises(bulk.BulkError, match="not an output row"):
        bulk.resume_point(out)


def test_connect_options_from_env(tmp_path):
    seed = tmp_path / "acme.nk"
    seed.write_text("SUAFAKESEED\n")
    options = fleet_client.ConnectOptions.from_env(
        {"NATS_URL": "nats://a:1, nats://b:2", "NATS_NKEY_FILE": str(seed), "NATS_TOKEN": "t"}, token="given"
    )
    kwargs = options.nats_kwargs()
    assert kwargs["servers"] == ["nats://a:1", "nats://b:2"]
    assert kwargs["nkeys_seed_str"] == "SUAFAKESEED" and kwargs["token"] == "given"
    assert "tls" not in kwargs
    assert "tls" in fleet_client.ConnectOptions(url="tls://127.0.0.1:4222").nats_kwargs()
    with pytest.raises(fleet_client.FleetError):
        fleet_client.ConnectOptions(tls_cert="c.pem").nats_kwargs()
    with pytest.raises(TypeError):
        fleet_client.ConnectOptions.from_env({}, bogus=1)
