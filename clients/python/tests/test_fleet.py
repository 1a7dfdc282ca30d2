"""Integration tests against a real local fleet (conftest.py): infer, typed refusals, submit and
stored results, and bulk embedding with kill-and-resume, against the Rust `fleet submit`."""
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import fleet_client
from fleet_client import FleetClient, FleetRefused, bulk

MODEL = "all-minilm-l6-v2"


def run(coro):
    return asyncio.run(coro)


async def _client(fleet, tenant="acme"):
    return await FleetClient.connect(fleet.key(tenant), **fleet.connect_options(tenant))


def test_infer_returns_384_dim_vectors(fleet):
    async def go():
        async with await _client(fleet) as client:
            assert client.nc.connected_url.scheme == "tls"
            return await client.infer(["hello", "world", "Fleet embeds text."], timeout=30)

    result = run(go())
    assert result.ok and result.status == "ok" and result.tenant == "acme" and result.model == MODEL
    assert result.dims == 384 and len(result.vectors) == 3
    for vector in result.vectors:
        assert len(vector) == 384
        assert abs(math.sqrt(sum(x * x for x in vector)) - 1.0) < 1e-3  # normalized by default
    assert result.vectors[0] != result.vectors[1]


def test_infer_repeated_job_id_gets_the_same_answer(fleet):
    job_id = fleet_client.new_job_id()

    async def go():
        async with await _client(fleet) as client:
            first = await client.infer(["same job twice"], job_id=job_id)
            second = await client.infer(["same job twice"], job_id=job_id)
            return first, second

    first, second = run(go())
    assert first.job_id == second.job_id == job_id
    assert first.vectors == second.vectors


def test_text_over_32_kib_is_refused_too_large(fleet):
    async def go():
        async with await _client(fleet) as client:
            with pytest.raises(FleetRefused) as infer_refused:
                await client.infer(["x" * (32 * 1024 + 1)])
            with pytest.raises(FleetRefused) as submit_refused:
                await client.submit(["x" * (32 * 1024 + 1)])
            unchecked = await client.infer(["x" * (32 * 1024 + 1)], check=False)
            return infer_refused.value, submit_refused.value, unchecked

    infer_refused, submit_refused, unchecked = run(go())
    assert infer_refused.code == "too_large" and infer_refused.message
    assert isinstance(infer_refused.answer, fleet_client.JobResult)
    assert submit_refused.code == "too_large"
    assert unchecked.status == "rejected" and unchecked.error.code == "too_large"


def test_model_the_tenant_may_not_use_is_refused_forbidden(fleet):
    async def go():
        async with await _client(fleet, "limited") as client:
            with pytest.raises(FleetRefused) as refused:
                await client.infer(["not for me"])
            return refused.value

    refused = run(go())
    assert refused.code == "forbidden", refused


def test_submit_then_get_result(fleet):
    async def go():
        async with await _client(fleet) as client:
            reply = await client.submit(["queued text", "another one"])
            assert reply.accepted and not reply.duplicate and isinstance(reply.stream_seq, int)
            again = await client.submit(["queued text", "another one"], job_id=reply.job_id)
            assert again.accepted and again.duplicate and again.stream_seq == reply.stream_seq
            stored = await client.wait_result(reply.job_id, timeout=60)
            direct = await client.get_result(reply.job_id)
            missing = await client.get_result(fleet_client.new_job_id())
            infer = await client.infer(["queued text"])
            return reply, stored, direct, missing, infer

    reply, stored, direct, missing, infer = run(go())
    assert stored is not None and stored.ok and stored.job_id == reply.job_id
    assert len(stored.vectors) == 2 and all(len(v) == 384 for v in stored.vectors)
    assert direct == stored
    assert missing is None
    assert infer.vectors[0] == stored.vectors[0]  # the same text, the same embedding


def _write_rows(path, prefix, count, huge_at=()):
    with open(path, "w", encoding="utf-8") as out:
        for i in range(count):
            row_id = i if i % 3 else f"{prefix}-{i}"  # ints and strings
            text = "x" * (40 * 1024) if i in huge_at else f"{prefix} row {i}: \"quoted\", café, tab\there, line {i % 7}"
            out.write(json.dumps({"id": row_id, "text": text, "other": i}) + "\n")
            if i == 5:
                out.write("\n")  # blank lines are skipped


def _rust_submit(fleet, input, output, texts_per_job):
    return subprocess.run(
        [str(fleet.bin / "fleet"), "submit", "--nats-nkey-file", str(fleet.work / "acme.nk"), "--key", fleet.key(),
         "--input", str(input), "--output", str(output), "--texts-per-job", str(texts_per_job), "--in-flight", "8"],
        env=fleet.env(), capture_output=True, text=True, timeout=600,
    )


def test_bulk_job_ids_and_rows_equal_the_rust_client(fleet, tmp_path):
    rows = tmp_path / "rows.jsonl"
    _write_rows(rows, "shared", 90, huge_at=(17,))
    rust = _rust_submit(fleet, rows, tmp_path / "rust.jsonl", 8)
    assert rust.returncode == 4, rust.stderr  # 4: some rows failed (the job with the huge text)
    summary = fleet_client.embed_file(rows, tmp_path / "python.jsonl", key=fleet.key(), texts_per_job=8,
                                      in_flight=8, **fleet.connect_options())
    # Same job ids: every job the Rust run had answered was found stored under the id it used;
    # only the job the dispatcher refused (never stored) is sent again, as a Rust re-run would.
    assert summary.jobs_from_store == math.ceil(90 / 8) - 1 and summary.jobs_sent == 1, summary
    assert summary.rows_ok == 82 and summary.rows_failed == 8 and summary.rows_failed_in_output == 8
    assert (tmp_path / "python.jsonl").read_bytes() == (tmp_path / "rust.jsonl").read_bytes()
    assert (tmp_path / "python.jsonl.errors").read_bytes() == (tmp_path / "rust.jsonl.errors").read_bytes()
    failed = [json.loads(line) for line in (tmp_path / "python.jsonl.errors").read_text().splitlines()]
    assert {row["code"] for row in failed} == {"too_large"}
    assert [row["id"] for row in failed] == [16, 17, "shared-18", 19, 20, "shared-21", 22, 23]


BULK_SCRIPT = """
import sys, fleet_client, json
opts = json.loads(sys.argv[4])
s = fleet_client.embed_file(sys.argv[1], sys.argv[2], key=sys.argv[3], texts_per_job=2, in_flight=2, **opts)
print(json.dumps(s.as_dict()))
"""


def test_embed_file_killed_and_resumed_equals_an_uninterrupted_run(fleet, tmp_path):
    rows = tmp_path / "rows.jsonl"
    total = 200
    _write_rows(rows, "resume", total)
    out = tmp_path / "resumed.jsonl"
    args = [sys.executable, "-c", BULK_SCRIPT, str(rows), str(out), fleet.key(), json.dumps(fleet.connect_options())]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = out.read_bytes().count(b"\n")
    assert 20 <= kept < total, kept
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["rows_already_done"] >= 20 and summary["rows_already_done"] <= kept
    assert summary["rows_already_done"] + summary["rows_ok"] == total and summary["rows_failed"] == 0
    # Nothing already written was asked for again.
    assert summary["jobs_sent"] + summary["jobs_from_store"] == math.ceil((total - summary["rows_already_done"]) / 2)

    # An uninterrupted run over the same input: all from the store, the same bytes.
    whole = fleet_client.embed_file(rows, tmp_path / "whole.jsonl", key=fleet.key(), texts_per_job=2,
                                    **fleet.connect_options())
    assert whole.jobs_sent == 0 and whole.rows_ok == total
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    # The Rust client over the same input asks for the same jobs and writes the same rows.
    rust = _rust_submit(fleet, rows, tmp_path / "rust.jsonl", 2)
    assert rust.returncode == 0, rust.stderr
    assert (tmp_path / "rust.jsonl").read_bytes() == out.read_bytes()
    lines = out.read_text().splitlines()
    assert len(lines) == total
    expected_ids = [i if i % 3 else f"resume-{i}" for i in range(total)]
    assert [json.loads(line)["id"] for line in lines] == expected_ids


def test_embed_file_vectors_equal_infer(fleet, tmp_path):
    rows = tmp_path / "rows.jsonl"
    _write_rows(rows, "check", 5)
    fleet_client.embed_file(rows, tmp_path / "out.jsonl", key=fleet.key(), texts_per_job=32, **fleet.connect_options())
    texts = [json.loads(line)["text"] for line in rows.read_text().splitlines() if line.strip()]
    result = fleet_client.infer(texts, key=fleet.key(), **fleet.connect_options())
    vectors = [json.loads(line)["vector"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert vectors == result.vectors


def test_unknown_model_is_refused(fleet):
    async def go():
        async with await _client(fleet) as client:
            with pytest.raises(FleetRefused) as refused:
                await client.infer(["x"], model="no-such-model")
            return refused.value

    assert run(go()).code == "unknown_model"


def test_settings_from_the_environment(fleet):
    """Only NATS_* and FLEET_* variables, as the Rust commands read them."""
    env = fleet.env()
    env.update(NATS_NKEY_FILE=str(fleet.work / "acme.nk"), FLEET_KEY=fleet.key())
    script = "import fleet_client; r = fleet_client.infer(['from the environment']); print(r.tenant, r.dims)"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["acme", "384"]
