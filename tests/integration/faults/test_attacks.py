"""Bad input and abuse against the live app: each refused with a clear 4xx, nothing executed.

Every attack is sent several times over real HTTP; an answer other than the
expected status, or one without a ``detail`` saying why, counts as failed in
the fault report. The service must still answer a good part afterwards.
"""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from collections.abc import Callable

import httpx
import pytest
import redis
import torch
from PIL import Image

from deployments.imaging import encode_png
from loadtests.faults import FaultRow
from models.artifacts import ArtifactRegistry
from tests.integration.faults.conftest import CATEGORY

pytestmark = [pytest.mark.slow, pytest.mark.faults]
TRIES = 3


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def decompression_bomb(side: int = 30_000) -> bytes:
    """A real PNG bomb: ``side`` x ``side`` one-bit pixels of zeros, about 100 kB on the wire."""
    row = b"\0" + b"\0" * ((side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def _multipart(url: str, data: bytes, content_type: str = "image/png", **form) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/inspect",
        files={"image": ("part", data, content_type)},
        data={"category": CATEGORY} | form,
        timeout=120,
    )


def _record(
    fault_report: list,
    name: str,
    send: Callable[[int], httpx.Response],
    expected: set[int],
    tries: int = TRIES,
) -> list[httpx.Response]:
    answers = [send(i) for i in range(tries)]

    def clear(answer: httpx.Response) -> bool:
        try:
            detail = answer.json().get("detail")
        except ValueError:
            return False
        return answer.status_code in expected and bool(detail)

    fault_report.append(
        FaultRow(
            name,
            tries=tries,
            requests=tries,
            failed=sum(not clear(a) for a in answers),
            extra={"statuses": sorted({a.status_code for a in answers})},
        )
    )
    for answer in answers:
        assert clear(answer), (name, answer.status_code, answer.text[:300])
    return answers


def _png(seed: int, size: int = 96) -> bytes:
    return encode_png(Image.new("RGB", (size, size), (seed % 256, 90, 60)))


def test_bad_images_and_bodies_get_a_clear_4xx(drill, fault_report):
    url = drill.url
    png = _png(1)
    gif, webp = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, "GIF")
    Image.new("RGB", (64, 64)).save(webp, "WEBP")
    bomb = decompression_bomb()
    assert len(bomb) < 200_000  # small on the wire, 900 megapixels decoded

    def corrupt(i: int) -> bytes:
        damaged = bytearray(_png(i))
        for k in range(40, len(damaged) - 20, 7):
            damaged[k] ^= 0x5A
        return bytes(damaged)

    attacks: list[tuple[str, Callable[[int], httpx.Response], set[int]]] = [
        ("corrupt PNG (bytes flipped)", lambda i: _multipart(url, corrupt(i)), {422}),
        ("truncated PNG", lambda i: _multipart(url, _png(i)[: 40 + i * 10]), {422}),
        ("zero-byte image", lambda i: _multipart(url, b""), {422}),
        (
            "huge upload (21 MiB)",
            lambda i: _multipart(url, png + os.urandom(21 * 1024 * 1024)),
            {413},
        ),
        ("decompression bomb (30000 x 30000 PNG)", lambda i: _multipart(url, bomb), {413}),
        ("wrong format (GIF)", lambda i: _multipart(url, gif.getvalue()), {415}),
        ("wrong format (WebP)", lambda i: _multipart(url, webp.getvalue()), {415}),
        ("text sent as an image", lambda i: _multipart(url, b"GET / HTTP/1.1\r\n" * 8), {415}),
        (
            "wrong content type of the file part (text/html)",
            lambda i: _multipart(url, png, content_type="text/html"),
            {415},
        ),
        (
            "wrong request content type (raw image/png body)",
            lambda i: httpx.post(
                f"{url}/v1/inspect", content=png, headers={"content-type": "image/png"}
            ),
            {415},
        ),
        (
            "malformed JSON",
            lambda i: httpx.post(
                f"{url}/v1/inspect",
                content=b'{"image_base64": "abc",',
                headers={"content-type": "application/json"},
            ),
            {422},
        ),
        (
            "JSON of the wrong shape",
            lambda i: httpx.post(f"{url}/v1/inspect", json=[{"image": 1}, i]),
            {422},
        ),
        (
            "JSON with bad base64",
            lambda i: httpx.post(f"{url}/v1/inspect", json={"image_base64": "%%%" * (i + 1)}),
            {422},
        ),
        ("unknown category", lambda i: _multipart(url, png, category=f"no_such_part_{i}"), {422}),
        (
            "category with path and markup characters",
            lambda i: _multipart(url, png, category="../../etc/passwd<script>"),
            {422},
        ),
        ("flag that is not a boolean", lambda i: _multipart(url, png, explain="maybe"), {422}),
        (
            "batch of 10,000 items",
            lambda i: httpx.post(
                f"{url}/v1/inspect/batch",
                json={"items": [{"image_base64": ""}] * 10_000},
                timeout=60,
            ),
            {413, 422},
        ),
    ]
    for name, send, expected in attacks:
        _record(fault_report, name, send, expected)
    good = _multipart(url, png)
    assert good.status_code == 200, good.text


def test_defect_descriptions_with_markup_or_absurd_length_are_refused(drill, fault_report):
    url = f"{drill.url}/v1/categories/{CATEGORY}/defect-types"
    base = {"name": "rust", "description": "orange-brown patches", "keywords": ["rust"]}
    attacks = [
        ("description with a script tag", {"description": "<script>alert(1)</script> spots"}),
        ("description with a markdown link", {"description": "see [here](javascript:alert(1))"}),
        ("contrast with a template", {"contrast": "{{ config.__class__ }}"}),
        ("description of 1 MB", {"description": "rust " * 200_000}),
        ("2,000 keywords", {"keywords": [f"k{i}" for i in range(2000)]}),
        ("name with a path", {"name": "../../etc/passwd"}),
        ("description with control characters", {"description": "rust\x00\x1b[31m red"}),
    ]
    for name, change in attacks:
        _record(
            fault_report,
            f"defect type: {name}",
            lambda i, c=change: httpx.post(url, json=base | c, timeout=60),
            {422},
        )
    listing = httpx.get(f"{drill.url}/v1/categories", timeout=30).json()
    types = [t["name"] for c in listing["categories"] for t in c["defect_types"]]
    assert "../../etc/passwd" not in types


def test_api_keys_refuse_strangers_and_limit_each_key(drill, store, fault_report):
    key = store.add_api_key("line-1", rate_per_minute=5)
    other = store.add_api_key("line-2", categories=["painted_panel"])
    revoked = store.add_api_key("old-line")
    store.revoke_api_key(revoked)
    url = drill.url

    def inspect(headers: dict[str, str], i: int) -> httpx.Response:
        return httpx.post(
            f"{url}/v1/inspect",
            files={"image": ("part", _png(i), "image/png")},
            data={"category": CATEGORY},
            headers=headers,
            timeout=60,
        )

    try:
        # Each router replica re-reads on its own whether keys exist.
        _until_every_replica(lambda: inspect({}, 0).status_code == 401, "keys required")
        _record(fault_report, "auth: no key", lambda i: inspect({}, i), {401})
        _record(
            fault_report, "auth: wrong key", lambda i: inspect({"X-API-Key": f"guess{i}"}, i), {401}
        )
        _record(
            fault_report, "auth: revoked key", lambda i: inspect({"X-API-Key": revoked}, i), {403}
        )
        _record(
            fault_report,
            "auth: another tenant's key (other categories)",
            lambda i: inspect({"X-API-Key": other}, i),
            {403},
        )
        _record(
            fault_report,
            "auth: no key on the catalog",
            lambda i: httpx.get(f"{url}/v1/categories", timeout=30),
            {401},
        )
        statuses = [inspect({"X-API-Key": key}, i).status_code for i in range(8)]
        limited = [s for s in statuses if s == 429]
        fault_report.append(
            FaultRow(
                "auth: 8 requests on a key limited to 5 a minute",
                tries=1,
                requests=8,
                failed=sum(s not in (200, 429) for s in statuses),
                extra={"200": statuses.count(200), "429": len(limited)},
            )
        )
        assert statuses[:5] == [200] * 5 and len(limited) == 3, statuses
        answer = inspect({"X-API-Key": key}, 99)
        assert answer.status_code == 429 and 1 <= int(answer.headers["Retry-After"]) <= 60
    finally:
        plain = redis.Redis.from_url(drill.redis_url)
        for name in plain.scan_iter(f"{store.prefix}:apikey*"):
            plain.delete(name)
        plain.close()
    _until_every_replica(lambda: inspect({}, 0).status_code == 200, "keys no longer required")


class _Payload:
    """Unpickling this writes a file: proof that a checkpoint was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_or_pickled_checkpoint_is_refused_not_executed(
    drill, tiny_registry, fault_report, tmp_path
):
    registry = ArtifactRegistry(tiny_registry.uri)
    good = registry.manifest(CATEGORY, "detector")
    marker = tmp_path / "executed"
    try:
        # A pickle in place of the weights, its manifest's sha256 forged to match.
        pickled = io.BytesIO()
        torch.save({"weights": _Payload(str(marker))}, pickled)
        bad = _replace_weights(registry, good.version, pickled.getvalue(), forge_sha=True)
        answers = _inspect_after_promotion(drill, registry, bad)
        pickle_row = _refused_row("checkpoint: pickle in place of safetensors", answers)
        # Safetensors bytes changed after the manifest was written.
        state = registry.load(CATEGORY, "detector", good.version).state_dict
        from safetensors.torch import save

        blob = bytearray(save({k: v.contiguous() for k, v in state.items()}))
        blob[-16] ^= 0xFF
        bad = _replace_weights(registry, good.version, bytes(blob), forge_sha=False)
        answers = _inspect_after_promotion(drill, registry, bad)
        tampered_row = _refused_row("checkpoint: weights tampered after signing", answers)
    finally:
        registry.promote(CATEGORY, "detector", good.version)
    fault_report.extend([pickle_row, tampered_row])
    assert not marker.exists(), "the pickled checkpoint was executed"
    for row in (pickle_row, tampered_row):
        assert row.failed == 0, row
    _wait_until_every_replica_serves(drill, good.version)
    assert _multipart(drill.url, _png(7)).status_code == 200, "the good version is not served"


def _replace_weights(registry: ArtifactRegistry, good: str, blob: bytes, forge_sha: bool) -> str:
    """A new version of the detector (a copy of ``good``) with ``blob`` as its weights."""
    import hashlib
    import json

    artifact = registry.load(CATEGORY, "detector", good)
    manifest = artifact.manifest
    version = registry.save(
        CATEGORY,
        "detector",
        artifact.state_dict,
        config=manifest.config,
        preprocessing=manifest.preprocessing,
        data=manifest.data,
        metrics=manifest.metrics,
    ).version
    folder = f"{registry.uri}/{CATEGORY}/detector/{version}"
    with open(f"{folder}/weights.safetensors", "wb") as out:
        out.write(blob)
    if forge_sha:
        with open(f"{folder}/manifest.json") as manifest_file:
            record = json.load(manifest_file)
        record["weights"]["sha256"] = hashlib.sha256(blob).hexdigest()
        with open(f"{folder}/manifest.json", "w") as out:
            json.dump(record, out)
    return version


def _inspect_after_promotion(
    drill, registry: ArtifactRegistry, version: str
) -> list[httpx.Response]:
    registry.promote(CATEGORY, "detector", version)
    _wait_until_every_replica_serves(drill, version)
    return [_multipart(drill.url, _png(100 + i)) for i in range(TRIES)]


def _wait_until_every_replica_serves(drill, version: str) -> None:
    def serves() -> bool:
        models = httpx.get(f"{drill.url}/healthz", timeout=30).json()["models"]
        return models.get(f"{CATEGORY}/detector") == version

    _until_every_replica(serves, f"version {version} served")


def _until_every_replica(holds: Callable[[], bool], what: str, streak: int = 12) -> None:
    """Until ``holds()`` is true ``streak`` times in a row, whichever router replicas
    answer: each replica picks a change (a promotion, API keys added or removed) up on
    its own refresh, and one still on the old state would answer some of the requests.
    """
    deadline = time.monotonic() + 60
    in_a_row = 0
    while in_a_row < streak:
        in_a_row = in_a_row + 1 if holds() else 0
        assert time.monotonic() < deadline, f"not every replica had {what} after 60 s"
        time.sleep(0.2 if in_a_row else 0.5)


def _refused_row(name: str, answers: list[httpx.Response]) -> FaultRow:
    def refused(answer: httpx.Response) -> bool:
        return answer.status_code == 503 and "refus" in answer.json().get("detail", "")

    return FaultRow(
        name,
        tries=len(answers),
        requests=len(answers),
        failed=sum(not refused(a) for a in answers),
        extra={
            "statuses": sorted({a.status_code for a in answers}),
            "detail": answers[0].text[:160],
        },
    )
