"""A cluster in the settings: CONTINUUM_NATS_URL's server list reaches nats-py (and so FastStream's broker and the
command line) whole; CONTINUUM_STREAM_REPLICAS, or the server's own report, sets the replicas of every stream
and bucket the topology declares."""

from __future__ import annotations

import ssl

import pytest

from shared.bus import connect_options, create_bus, replicas_for
from shared.contracts.streams import CLUSTER_REPLICAS, Topology
from shared.contracts.subjects import Subjects
from shared.settings import SettingsError, load_settings

TOPOLOGY = Topology(Subjects())
CLUSTER = "tls://nats-1:4222, tls://nats-2:4222,tls://nats-3:4222"


def test_a_comma_separated_url_is_the_list_of_servers():
    options = connect_options(load_settings(nats_url=CLUSTER))
    assert options["servers"] == ["tls://nats-1:4222", "tls://nats-2:4222", "tls://nats-3:4222"]
    assert isinstance(options["tls"], ssl.SSLContext), "tls:// servers: TLS, with the system's CA when none is given"
    assert connect_options(load_settings(nats_url="nats://127.0.0.1:4222"))["servers"] == ["nats://127.0.0.1:4222"]


def test_the_broker_is_given_every_server_of_the_list():
    bus = create_bus(load_settings(nats_url=CLUSTER), "intake")
    servers = bus.broker._connection_kwargs["servers"]  # what FastStream gives nats.connect
    assert servers == ["tls://nats-1:4222", "tls://nats-2:4222", "tls://nats-3:4222"]


def test_replicas_follow_what_the_server_reports_of_its_cluster():
    assert replicas_for(None) == 1
    assert replicas_for({"server_name": "n", "jetstream": True}) == 1, "a server alone"
    urls = ["10.0.0.1:4222", "10.0.0.2:4222", "10.0.0.3:4222"]
    assert replicas_for({"cluster": "continuum", "connect_urls": urls}) == CLUSTER_REPLICAS == 3
    assert replicas_for({"cluster": "continuum", "connect_urls": [*urls, "10.0.0.4:4222", "10.0.0.5:4222"]}) == 3
    assert replicas_for({"cluster": "continuum", "connect_urls": urls[:2]}) == 1, "two servers keep no quorum of 3"
    assert replicas_for({"cluster": "continuum", "connect_urls": [urls[0]] * 3}) == 1, "one server counted once"
    assert replicas_for({"cluster": "continuum"}) == 1, "a cluster that advertises nothing (no_advertise)"


def test_every_stream_and_bucket_takes_the_replicas_given():
    assert {c.num_replicas for c in TOPOLOGY.stream_configs()} == {1}
    configs = TOPOLOGY.stream_configs(3)
    assert {c.num_replicas for c in configs} == {3}
    assert {c.name for c in configs} == {TOPOLOGY.events_stream, TOPOLOGY.intake_stream, TOPOLOGY.dispatch_stream,
                                         TOPOLOGY.dead_letter_stream, TOPOLOGY.reports_stream}
    for bucket in TOPOLOGY.buckets:
        config = TOPOLOGY.bucket_config(bucket, 3)
        assert (config.bucket, config.replicas, config.direct, config.history) == (bucket, 3, True, 1)
        assert TOPOLOGY.bucket_stream(bucket) == f"KV_{bucket}"


@pytest.mark.parametrize("value", ["0", "6", "three"])
def test_a_replica_count_jetstream_cannot_keep_stops_the_service_naming_the_variable(value, monkeypatch):
    monkeypatch.setenv("CONTINUUM_STREAM_REPLICAS", value)
    with pytest.raises(SettingsError, match="CONTINUUM_STREAM_REPLICAS"):
        load_settings()
