"""Transport configs (keys named in errors), the registry, and the shared ack mapping."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

import pytest

from pymigrate.errors import ConfigError, PayloadRejected, ThrottledError, TransportError
from pymigrate.types import Ack
from transports._common import KeyedLocks, check_ack, client_tls_context, transport_ack
from transports.amqp import AmqpIngestServer, AmqpUplink
from transports.base import IngestServer, Uplink
from transports.coap import CoapIngestServer, CoapUplink, parse_coap_uri, response_for
from transports.config import (
    AmqpConfig,
    CoapConfig,
    MqttConfig,
    parse_endpoint,
    parse_transport,
    parse_transports,
)
from transports.mqtt import MqttIngestServer, MqttUplink, ack_topic, up_topic
from transports.registry import build_ingest_server, build_uplink, build_uplinks

TOML = """
[[uplink.transports]]
type = "mqtt"
host = "broker.local"
prefix = "acme/site1"
protocol = "3.1.1"
ca_file = "/etc/ca.pem"

[[uplink.transports]]
type = "coap"
port = 5684
ack_timeout_s = 0.5

[[uplink.transports]]
type = "amqp"
queue = "ingest.q"
max_queue_length = 1000
"""


def test_failover_list_from_toml() -> None:
    items = tomllib.loads(TOML)["uplink"]["transports"]
    cfgs = parse_transports(items)
    assert [type(c) for c in cfgs] == [MqttConfig, CoapConfig, AmqpConfig]
    mqtt = cfgs[0]
    assert isinstance(mqtt, MqttConfig)
    assert mqtt.use_tls and mqtt.protocol == "3.1.1" and mqtt.prefix == "acme/site1"
    assert isinstance(cfgs[1], CoapConfig) and cfgs[1].uri == "coap://127.0.0.1:5684/ingest"
    assert CoapConfig(host="::1").uri == "coap://[::1]:5683/ingest"
    assert isinstance(cfgs[2], AmqpConfig) and not cfgs[2].use_tls


@pytest.mark.parametrize(("name", "data", "key"), [
    ("mqtt", {"port": 0}, "uplink.mqtt.port"),
    ("mqtt", {"protocol": "4"}, "uplink.mqtt.protocol"),
    ("mqtt", {"prefix": "a/+"}, "uplink.mqtt.prefix"),
    ("mqtt", {"prefix": "/a"}, "uplink.mqtt.prefix"),
    ("mqtt", {"share_group": "a/b"}, "uplink.mqtt.share_group"),
    ("mqtt", {"keepalive_s": 0}, "uplink.mqtt.keepalive_s"),
    ("mqtt", {"session_expiry_s": -1}, "uplink.mqtt.session_expiry_s"),
    ("mqtt", {"key_file": "k.pem"}, "uplink.mqtt.key_file"),
    ("mqtt", {"password": "x"}, "uplink.mqtt.password"),
    ("mqtt", {"hostt": "x"}, "uplink.mqtt.hostt"),
    ("mqtt", {"port": "many"}, "uplink.mqtt.port"),
    ("coap", {"path": "a/b"}, "uplink.coap.path"),
    ("coap", {"ack_timeout_s": 0}, "uplink.coap.ack_timeout_s"),
    ("coap", {"port": 70000}, "uplink.coap.port"),
    ("amqp", {"exchange": ""}, "uplink.amqp.exchange"),
    ("amqp", {"routing_prefix": "up.*"}, "uplink.amqp.routing_prefix"),
    ("amqp", {"prefetch": 0}, "uplink.amqp.prefetch"),
    ("amqp", {"max_queue_length": -1}, "uplink.amqp.max_queue_length"),
    ("amqp", {"identity": "cert"}, "uplink.amqp.identity"),
    ("amqp", {"key_file": "k"}, "uplink.amqp.key_file"),
    ("smtp", {}, "uplink.type"),
])
def test_errors_name_the_key(name: str, data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_transport(name, data)
    assert ei.value.key == key


def test_cloud_sections_name_their_own_key() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_transport("amqp", {"prefetch": 0}, section="ingest")
    assert ei.value.key == "ingest.amqp.prefetch"
    with pytest.raises(ConfigError) as ei:
        parse_transport("mqtt", {"bogus": 1}, section="ingest")
    assert ei.value.key == "ingest.mqtt.bogus"


def test_list_items_need_a_type() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_transports([{"type": "coap"}, {"host": "x"}])
    assert ei.value.key == "uplink.transports[1].type"


def test_registry_builds_each_transport() -> None:
    ups = build_uplinks([MqttConfig(), {"type": "coap"}, AmqpConfig(end_to_end=False)], "dev-1")
    assert [u.name for u in ups] == ["mqtt", "coap", "amqp"]
    assert all(isinstance(u, Uplink) for u in ups)
    assert isinstance(ups[0], MqttUplink) and isinstance(ups[1], CoapUplink)
    assert isinstance(ups[2], AmqpUplink) and ups[2].end_to_end is False
    assert ups[2].routing_key == "up.dev-1"
    assert isinstance(build_uplink(MqttConfig(end_to_end=False), "d"), MqttUplink)
    servers = [build_ingest_server(c) for c in (MqttConfig(), CoapConfig(), AmqpConfig())]
    assert all(isinstance(s, IngestServer) for s in servers)
    assert isinstance(servers[0], MqttIngestServer)
    assert servers[0].subscription == "$share/pymigrate-ingest/pymigrate/up/+"
    assert isinstance(servers[1], CoapIngestServer) and isinstance(servers[2], AmqpIngestServer)
    with pytest.raises(ConfigError):
        build_uplinks([], "dev-1")
    with pytest.raises(ConfigError):
        build_uplink(MqttConfig(), "")
    with pytest.raises(ConfigError):
        build_uplink("mqtt", "d")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        build_ingest_server("mqtt")  # type: ignore[arg-type]


def test_topics() -> None:
    assert up_topic("p", "d") == "p/up/d" and ack_topic("p", "d") == "p/ack/d"
    assert parse_coap_uri("coap://10.0.0.1:5700/x") == ("10.0.0.1", 5700)
    assert parse_coap_uri("coap://h/x") == ("h", 5683)


def _ack(status: str, **kw: object) -> Ack:
    return Ack("b1", status, 1, 2, **kw)  # type: ignore[arg-type]


def test_check_ack_maps_statuses_to_typed_errors() -> None:
    assert check_ack(_ack("ok"), "b1", "x").status == "ok"
    assert check_ack(_ack("duplicate"), "b1", "x").status == "duplicate"
    with pytest.raises(ThrottledError) as te:
        check_ack(_ack("throttled", retry_after_s=4.5), "b1", "x")
    assert te.value.retry_after_s == 4.5
    with pytest.raises(ThrottledError) as te:
        check_ack(_ack("throttled"), "b1", "x")
    assert te.value.retry_after_s == 1.0  # never "retry immediately"
    with pytest.raises(PayloadRejected) as pr:
        check_ack(_ack("rejected", reason="decode"), "b1", "x")
    assert pr.value.reason == "decode" and not pr.value.retriable
    with pytest.raises(TransportError) as tr:
        check_ack(_ack("error", reason="store_unavailable"), "b1", "x")
    assert tr.value.retriable and not isinstance(tr.value, ThrottledError)
    t = transport_ack("b9", 123)
    assert (t.batch_id, t.status, t.reason, t.t_recv_ms) == ("b9", "ok", "transport", 123)


def test_coap_response_codes() -> None:
    assert str(response_for(_ack("ok")).code).startswith("2.04")
    m = response_for(_ack("throttled", retry_after_s=0.2))
    assert str(m.code).startswith("5.03") and m.opt.max_age == 1
    assert str(response_for(_ack("rejected")).code).startswith("4.00")
    assert str(response_for(_ack("error")).code).startswith("5.00")


async def test_keyed_locks_order_and_cleanup() -> None:
    locks = KeyedLocks()
    order: list[str] = []

    async def work(key: str, tag: str, delay: float) -> None:
        async with locks.hold(key):
            await asyncio.sleep(delay)
            order.append(tag)

    await asyncio.gather(work("a", "a1", 0.03), work("a", "a2", 0.0), work("b", "b1", 0.01))
    assert order == ["b1", "a1", "a2"]  # one key in arrival order, keys independent
    assert len(locks) == 0


def test_tls_context_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        client_tls_context("uplink.mqtt", str(tmp_path / "nope.pem"), "", "")
    assert ei.value.key == "uplink.mqtt.ca_file"
    with pytest.raises(ConfigError) as ei:
        client_tls_context("uplink.amqp", "", str(tmp_path / "nope.crt"), "")
    assert ei.value.key == "uplink.amqp.cert_file"
    ctx = client_tls_context("uplink.mqtt", "", "", "", verify_hostname=False)
    assert ctx.check_hostname is False
    with pytest.raises(ConfigError):
        build_uplink(MqttConfig(ca_file=str(tmp_path / "missing.pem")), "d")


def test_amqp_cluster_nodes_parse_and_name_the_key() -> None:
    cfg = parse_transport("amqp", {"hosts": ["a", "b:5673", "[::1]:5674", " c:1 "], "port": 5671})
    assert isinstance(cfg, AmqpConfig)
    assert cfg.endpoints() == [("a", 5671), ("b", 5673), ("::1", 5674), ("c", 1)]
    assert AmqpConfig(host="h", port=1).endpoints() == [("h", 1)]
    assert parse_endpoint("k", "[fe80::1]", 9) == ("fe80::1", 9)
    for bad, key in ((["a:x"], "uplink.amqp.hosts[0]"), (["a", "b:0"], "uplink.amqp.hosts[1]"),
                     (["[::1"], "uplink.amqp.hosts[0]"), (["[::1]5"], "uplink.amqp.hosts[0]"),
                     ([""], "uplink.amqp.hosts[0]"), (["a b"], "uplink.amqp.hosts[0]"),
                     (["a:1", "a:1"], "uplink.amqp.hosts")):
        with pytest.raises(ConfigError) as ei:
            parse_transport("amqp", {"hosts": bad})
        assert ei.value.key == key, (bad, ei.value)
    with pytest.raises(ConfigError) as ei:
        parse_transport("amqp", {"queue_type": "stream"})
    assert ei.value.key == "uplink.amqp.queue_type"
    with pytest.raises(ConfigError) as ei:
        parse_transport("amqp", {"reconnect_max_s": 0})
    assert ei.value.key == "uplink.amqp.reconnect_max_s"
    with pytest.raises(ConfigError) as ei:  # the cloud's table names its own key
        parse_transport("amqp", {"hosts": ["a:99999"]}, section="cloud")
    assert ei.value.key == "cloud.amqp.hosts[0]"


def test_amqp_clients_spread_over_the_nodes() -> None:
    cfg = AmqpConfig(hosts=["n1:1", "n2:2", "n3:3"])
    first = {AmqpUplink(cfg, device_id=f"d{i}")._node for i in range(30)}
    assert first == {0, 1, 2}  # devices start on different nodes
    up = AmqpUplink(cfg, device_id="d0")
    start = up._node
    up._next_node()
    assert up._node == (start + 1) % 3  # a lost link moves it to the next node
    server = AmqpIngestServer(cfg)
    assert server.node in ("n1:1", "n2:2", "n3:3")
    assert cfg.queue_type == "auto"  # a new queue is a quorum queue
    assert server._queue_args() == {"x-queue-type": "quorum"}
    classic = AmqpIngestServer(AmqpConfig(queue_type="classic", max_queue_length=5))
    assert classic._queue_args() == {"x-max-length": 5, "x-overflow": "reject-publish"}


async def test_amqp_connect_tries_every_node_then_fails() -> None:
    from tests.conftest import free_port

    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    up = AmqpUplink(AmqpConfig(hosts=dead, connect_timeout_s=1.0), device_id="d")
    with pytest.raises(TransportError) as ei:
        await up.connect()
    assert ei.value.retriable and all(h in str(ei.value) for h in dead)
    server = AmqpIngestServer(AmqpConfig(hosts=dead, connect_timeout_s=1.0))
    with pytest.raises(TransportError):
        await server.start(lambda inc: None)  # type: ignore[arg-type,return-value]
