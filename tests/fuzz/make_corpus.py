"""Regenerate the seeded fuzz corpus: ``python -m tests.fuzz.make_corpus``.

Real samples (what each decoder sees in production) plus malformed ones (truncated,
bit-flipped, wrong magic/version, hostile shapes). Deterministic: same files every run.
Layout: ``corpus/<decoder>/<name>.<ext>``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import cbor2

from agent.codec import CODECS, seal_chunk
from pymigrate.envelope import Batch, encode_ack, encode_batch
from pymigrate.senml import to_senml_cbor, to_senml_json
from pymigrate.types import Ack, Priority, Reading
from transports import jobs_protocol as jp

HERE = Path(__file__).resolve().parent / "corpus"
T0 = 1_767_225_600_000


def _readings(n: int, dev: str = "fuzz-dev", seed: int = 1) -> list[Reading]:
    r = random.Random(seed)
    return [Reading(dev, f"s{i % 3}", T0 + i * 1000, round(r.uniform(-50, 50), 2),
                    Priority.NORMAL, i + 1) for i in range(n)]


def _mangle(b: bytes, seed: int) -> dict[str, bytes]:
    r = random.Random(seed)
    flip = bytearray(b)
    if flip:
        flip[r.randrange(len(flip))] ^= 0xFF
    return {"truncated": b[: len(b) // 2], "bitflip": bytes(flip), "tail_cut": b[:-1]}


def build() -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {k: {} for k in
                                        ("envelope", "codec", "senml", "json", "jobs",
                                         "config")}
    # envelope: real batches (several codecs, sizes) and broken ones
    for name, codec in (("zstd", "columnar-zstd"), ("lz4", "columnar-lz4"),
                        ("tsz", "tsz-zstd")):
        chunk = seal_chunk(_readings(50), codec)
        env = encode_batch(Batch("fuzz-dev", f"b-{name}", [chunk], sent_ms=T0))
        out["envelope"][f"batch_{name}.bin"] = env
    env = out["envelope"]["batch_zstd.bin"]
    for k, v in _mangle(env, 1).items():
        out["envelope"][f"batch_{k}.bin"] = v
    out["envelope"]["bad_magic.bin"] = b"XXXX" + env[4:]
    out["envelope"]["bad_version.bin"] = env[:4] + bytes([99]) + env[5:]
    out["envelope"]["empty.bin"] = b""
    out["envelope"]["ack.bin"] = encode_ack(Ack(batch_id="b-1", status="ok", t_recv_ms=T0,
                                                t_send_ms=T0 + 1, accepted=50))
    # codec payloads (decoded with the codec id in the file name)
    for name, c in CODECS.items():
        chunk = seal_chunk(_readings(40, seed=3), c)
        out["codec"][f"{c.codec_id}_{name}.bin"] = chunk.payload
        for k, v in _mangle(chunk.payload, c.codec_id).items():
            out["codec"][f"{c.codec_id}_{name}_{k}.bin"] = v
    # SenML
    rs = _readings(5)
    out["senml"]["pack.json"] = to_senml_json(rs, base_name="urn:dev:fuzz:")
    out["senml"]["pack.cbor"] = to_senml_cbor(rs, base_name="urn:dev:fuzz:")
    out["senml"]["rfc8428_ex.json"] = json.dumps([
        {"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1.320067464e09, "bu": "%RH", "v": 20},
        {"u": "lon", "v": 24.30621}, {"u": "lat", "v": 60.07965},
        {"t": 60, "v": 20.3}, {"u": "lon", "t": 60, "v": 24.30622}]).encode()
    out["senml"]["two_values.json"] = b'[{"n":"x","v":1,"vb":true}]'
    out["senml"]["string_value.json"] = b'[{"n":"x","vs":"hi"}]'
    out["senml"]["bad_name.json"] = b'[{"n":"","v":1}]'
    out["senml"]["huge_time.json"] = b'[{"n":"x","v":1,"t":1e300}]'
    out["senml"]["not_pack.cbor"] = cbor2.dumps({"n": "x"})
    out["senml"]["pack_truncated.cbor"] = out["senml"]["pack.cbor"][:-4]
    # JSON ingest payloads (agent MQTT source)
    out["json"]["one.json"] = b'{"sensor":"t1","value":21.5,"ts":1767225600000}'
    out["json"]["list.json"] = b'[{"sensor":"t1","value":1},{"sensor":"t2","value":2,' \
                               b'"priority":"critical"}]'
    out["json"]["wide.json"] = b'{"ts":"2026-01-01T00:00:00Z","t1":21.5,"h1":40,"ok":true}'
    out["json"]["bare.json"] = b"21.5"
    out["json"]["iso_ts.json"] = b'{"value":1,"ts":"2026-01-01T00:00:00.123+02:00"}'
    out["json"]["nan.json"] = b'{"value":NaN}'
    out["json"]["bad_prio.json"] = b'{"value":1,"priority":"urgent"}'
    out["json"]["string_val.json"] = b'{"value":"x"}'
    out["json"]["huge_ts.json"] = b'{"value":1,"ts":1e308}'
    out["json"]["nested.json"] = b'[[[[[[[[[[1]]]]]]]]]]'
    out["json"]["truncated.json"] = b'{"sensor":"t1","val'
    # job documents: real messages of each kind and broken ones
    notify = jp.JobNotify(job_id="j1", device_id="d1",
                          doc=jp.JobDocument(type="config", content="[device]\nid='d1'\n"))
    out["jobs"]["notify.json"] = jp.encode(notify)
    out["jobs"]["start.json"] = jp.encode(jp.JobStart(device_id="d1", job_id="j1"))
    out["jobs"]["update.json"] = jp.encode(jp.JobUpdate(device_id="d1", progress=0.5,
                                                        health=jp.Health(backlog_bytes=3)))
    out["jobs"]["result.json"] = jp.encode(jp.JobResult(device_id="d1", job_id="j1",
                                                        status="succeeded"))
    out["jobs"]["bad_status.json"] = out["jobs"]["result.json"].replace(b"succeeded", b"meh")
    out["jobs"]["future_version.json"] = out["jobs"]["start.json"].replace(b'"v":1', b'"v":9')
    out["jobs"]["truncated.json"] = out["jobs"]["notify.json"][:20]
    # agent configs (TOML text)
    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("default.toml", "agent-mqtt.toml", "agent-coap.toml", "agent-amqp.toml"):
        if (root / name).exists():
            out["config"][name] = (root / name).read_bytes()
    out["config"]["unknown_key.toml"] = b'[device]\nid = "x"\ncolour = "red"\n'
    out["config"]["bad_types.toml"] = b'[buffer]\nbudget_bytes = "lots"\n'
    out["config"]["bad_transport.toml"] = b'[uplink]\ntransports = ["pigeon"]\n'
    out["config"]["bad_source.toml"] = b'[[sources]]\ntype = "weather"\nsensors = 0\n'
    return out


def main() -> None:
    shutil.rmtree(HERE, ignore_errors=True)
    for kind, files in build().items():
        (HERE / kind).mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (HERE / kind / name).write_bytes(data)


if __name__ == "__main__":
    main()
