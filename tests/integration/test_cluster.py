"""Continuum on a three-server NATS cluster (deploy/nats/cluster/ as it ships, with `auth init`'s accounts and TLS,
on loopback): the topology the services declare gets three replicas of every stream and bucket, by the server's
own report when CONTINUUM_STREAM_REPLICAS is unset; a system made with one replica is brought to three, and a
service that sees fewer servers does not thin them out. With one server killed (-9), the one the client was on and
where the event stream and the jobs bucket had their leaders, a publish to the event stream and a key-value update
succeed on the two left, the client moves to another server of its list, and so does the command line.

The figures (the cluster's first leader, the failover) are printed: `pytest -s` shows them; docs/deploy.md has them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import orjson
import pytest
from nats.js.api import DEFAULT_PREFIX, ConsumerConfig

from services import cli
from services.auth import OPERATOR_PRINCIPAL, credentials
from services.runtime import free_port, nats_server_binary
from shared.bus import Bus, connect, create_bus
from shared.contracts.jobs import JobEvent, JobEventData, JobState
from shared.contracts.streams import CLUSTER_REPLICAS
from shared.settings import Settings
from tests.cluster import LoopbackCluster, eventually

pytestmark = pytest.mark.integration

SERVICE = "routing"  # whose durable consumer of the event stream is checked to follow the stream's replicas


def stream_names(bus: Bus) -> list[str]:
    """Every stream Continuum declares, its buckets' included."""
    return [c.name for c in bus.topology.stream_configs()] + [bus.topology.bucket_stream(b)
                                                             for b in bus.topology.buckets]


async def meta_leader(bus: Bus) -> bool:
    """Whether JetStream answers for the account: it does once the cluster has elected its meta leader."""
    reply = await bus.nc.request(f"{DEFAULT_PREFIX}.INFO", b"", timeout=0.5)
    return "error" not in orjson.loads(reply.data)


async def replicated(bus: Bus, stream: str, replicas: int = CLUSTER_REPLICAS):
    """The stream's info once it has a leader and `replicas` copies, every follower caught up; else None."""
    info = await bus.js.stream_info(stream)
    followers = (info.cluster.replicas or []) if info.cluster else []
    ready = (info.config.num_replicas == replicas and info.cluster and info.cluster.leader
             and len(followers) == replicas - 1 and all(p.current and not p.offline for p in followers))
    return info if ready else None


async def leader(bus: Bus, stream: str, other_than: str) -> str | None:
    """The stream's leader if it has one but `other_than`: asked with a short timeout (nats-py's own is 5 s), so
    that the moment a new one is elected is seen to within a fraction of a second."""
    reply = await bus.nc.request(f"{DEFAULT_PREFIX}.STREAM.INFO.{stream}", b"", timeout=0.25)
    elected = orjson.loads(reply.data).get("cluster", {}).get("leader")
    return elected if elected != other_than else None


async def lead_on(bus: Bus, stream: str, server: str) -> None:
    """Move the stream's leader to `server` (a leader stepdown with a preferred peer, NATS 2.11+)."""
    info = await bus.js.stream_info(stream)
    if info.cluster and info.cluster.leader == server:
        return
    await bus.nc.request(f"{DEFAULT_PREFIX}.STREAM.LEADER.STEPDOWN.{stream}",
                         orjson.dumps({"placement": {"preferred": server}}), timeout=5)

    async def moved() -> bool:
        return (await bus.js.stream_info(stream)).cluster.leader == server
    await eventually(moved, 15, f"{stream}'s leader on {server}")


def event(bus: Bus, n: int) -> tuple[str, JobEvent]:
    data = JobEventData(job_id=f"cluster-{n}", tenant="cnrs-lab", state=JobState.succeeded)
    return bus.subjects.job_event(data.tenant, data.job_id, data.state.value), JobEvent.of("test", data)


async def test_every_stream_and_bucket_has_three_replicas_and_survives_the_loss_of_a_server(
        nats_cluster: LoopbackCluster):
    started = time.monotonic()
    # a system made on one replica (before the cluster grew, say), with a durable consumer of the event stream
    single = create_bus(nats_cluster.settings(stream_replicas=1), SERVICE)
    await single.broker.connect()
    await eventually(lambda: meta_leader(single), 30, "the cluster's meta leader")
    elected_s = time.monotonic() - started
    # every route up: each server then reports the three (the replicas' default follows what the server reports)
    await eventually(nats_cluster.routed, 30, "every server routed to the others")
    routed_s = time.monotonic() - started
    await single.ensure_topology()
    durable = single.topology.durable(SERVICE, "cluster-test")
    await single.declare(single.topology.events_stream, durable, single.subjects.events_all, ConsumerConfig())
    for name in stream_names(single):
        assert (await single.js.stream_info(name)).config.num_replicas == 1, name
    await single.broker.stop()

    # a service of this version, CONTINUUM_STREAM_REPLICAS unset: the server it is on reports a cluster of three
    bus = create_bus(nats_cluster.settings(), SERVICE)
    await bus.broker.connect()
    try:
        assert bus.replicas() == CLUSTER_REPLICAS
        declared = time.monotonic()
        await bus.ensure_topology()
        for name in stream_names(bus):
            await eventually(lambda name=name: replicated(bus, name), 30, f"{name} on three servers")
        replicated_s = time.monotonic() - declared

        async def consumer_follows():
            info = await bus.js.consumer_info(bus.topology.events_stream, durable)
            return info.cluster and len(info.cluster.replicas or []) == CLUSTER_REPLICAS - 1
        await eventually(consumer_follows, 30, "the durable consumer on three servers")

        # a service that saw fewer servers (one of them away while it started) leaves the three copies as they are
        bus._replicas = 1
        await bus.ensure_topology()
        bus._replicas = None
        for name in stream_names(bus):
            assert (await bus.js.stream_info(name)).config.num_replicas == CLUSTER_REPLICAS, name

        # the server this client is on leads the event stream and the jobs bucket: killing it costs both a failover
        victim = bus.nc._server_info["server_name"]
        jobs = bus.topology.bucket_stream(bus.topology.jobs_bucket)
        for stream in (bus.topology.events_stream, jobs):
            await lead_on(bus, stream, victim)
        subject, first = event(bus, 1)
        await bus.publish_event(subject, first)
        await bus.update_json(bus.topology.jobs_bucket, "cluster-test", lambda _: {"writes": 1})
        stored = (await bus.js.stream_info(bus.topology.events_stream)).state.messages

        killed = time.monotonic()
        nats_cluster.kill(victim)

        async def moved() -> bool:
            return bus.nc.is_connected and bus.nc._server_info["server_name"] != victim
        await eventually(moved, 30, "the client on another server")
        reconnected_s = time.monotonic() - killed
        for stream in (bus.topology.events_stream, jobs):
            await eventually(lambda stream=stream: leader(bus, stream, other_than=victim), 30,
                             f"a new leader of {stream}")
        elected_again_s = time.monotonic() - killed
        subject, second = event(bus, 2)
        ack = await eventually(lambda: bus.publish_event(subject, second), 30, "a publish after the kill")
        published_s = time.monotonic() - killed
        value = await eventually(lambda: bus.update_json(bus.topology.jobs_bucket, "cluster-test",
                                                         lambda doc: {"writes": (doc or {})["writes"] + 1}),
                                 30, "a key-value update after the kill")
        updated_s = time.monotonic() - killed

        assert ack.stream == bus.topology.events_stream
        assert value == {"writes": 2}, "the update applied to the value written before the kill, once"
        events = await bus.js.stream_info(bus.topology.events_stream)
        assert events.state.messages == stored + 1, "the event stored once, however often it was sent"
        assert events.cluster.leader != victim
        assert victim in [p.name for p in events.cluster.replicas], "a copy of the stream waits on the dead server"
        last = await bus.js.get_last_msg(bus.topology.events_stream, subject)
        assert JobEvent.model_validate_json(last.data).id == second.id

        # a plain client (the command line's `connect`) given the list with the dead server first: the next one
        client = await connect(nats_cluster.settings(nats_url=",".join(
            [nats_cluster.servers[victim].url, *(s.url for s in nats_cluster.servers.values() if s.name != victim)])),
            dont_randomize=True, connect_timeout=2)
        try:
            assert client._server_info["server_name"] != victim
        finally:
            await client.close()

        # the killed server comes back on its store and catches up
        restarted = time.monotonic()
        nats_cluster.start(victim)
        for name in stream_names(bus):
            await eventually(lambda name=name: replicated(bus, name), 60, f"{name} caught up on {victim}")
        caught_up_s = time.monotonic() - restarted
    finally:
        await bus.broker.stop()
    print(f"\ncluster of three on loopback: meta leader elected {elected_s:.2f} s after the servers listened, "
          f"every route up at {routed_s:.2f} s; "
          f"{len(stream_names(bus))} streams and buckets brought from one to three replicas in {replicated_s:.2f} s; "
          f"after kill -9 of {victim} (the client's server, leader of the events and jobs): client on another "
          f"server in {reconnected_s:.2f} s, both streams with a new leader in {elected_again_s:.2f} s, publish "
          f"acknowledged in {published_s:.2f} s, key-value update in {updated_s:.2f} s; {victim} back and caught up in "
          f"{caught_up_s:.2f} s")


async def test_the_command_line_takes_the_server_list_and_passes_over_a_dead_server(nats_cluster: LoopbackCluster,
                                                                                    caplog, capsys):
    """`continuum status` with a server of the list down reaches the cluster: its answer is that nothing serves
    the request (no service runs here), not that the system cannot be reached; and not a word about the dead one
    (nats-py would log a traceback for it)."""
    nats_cluster.kill("nats-1")
    operator = nats_cluster.settings(nats_creds=credentials(nats_cluster.auth, OPERATOR_PRINCIPAL))
    # the dead server first, for certain (the client shuffles the list otherwise): the next one is taken
    client = await cli._connect(operator, dont_randomize=True)
    try:
        assert client._server_info["server_name"] != "nats-1"
    finally:
        await client.close()
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR") and r.name.startswith("nats")]
    assert capsys.readouterr().err == ""
    # the command as a user runs it
    env = dict(os.environ, CONTINUUM_NATS_URL=nats_cluster.url, CONTINUUM_DATA_DIR=str(nats_cluster.root / "data"))
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "status", "no-such-job", "--creds", str(operator.nats_creds),
         "--ca", str(operator.nats_ca)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert "nothing serves" in result.stderr and "cannot reach" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "encountered error" not in result.stderr, result.stderr


async def test_replicas_a_single_server_cannot_keep_stop_the_service_naming_the_setting(nats_server):
    bus = create_bus(Settings(nats_url=nats_server.url, stream_replicas=3), SERVICE)
    await bus.broker.connect()
    try:
        with pytest.raises(RuntimeError, match="CONTINUUM_STREAM_REPLICAS") as refused:
            await bus.ensure_topology()
        assert "non-clustered" in str(refused.value)
    finally:
        await bus.broker.stop()
    # unset, a server alone: one replica, as before clusters
    bus = create_bus(Settings(nats_url=nats_server.url), SERVICE)
    await bus.broker.connect()
    try:
        assert bus.replicas() == 1
        await bus.ensure_topology()
        for name in stream_names(bus):
            assert (await bus.js.stream_info(name)).config.num_replicas == 1, name
    finally:
        await bus.broker.stop()


async def test_a_server_without_a_certificate_of_the_clusters_ca_does_not_join_it(nats_cluster, tmp_path_factory):
    """Reaching a route port is not joining: a nats-server run from the same files, with a certificate of another
    `auth init` (another CA) and checking nothing of its peer (`insecure`), dials nats-1's route port; nats-1
    refuses it at the TLS handshake (cluster-tls.conf's CA: nats-server verifies a route's certificate whenever the
    cluster has TLS) and routes to the other two only."""
    other = LoopbackCluster(tmp_path_factory.mktemp("intruder"))  # its own auth/: another CA, another certificate
    tls = other.auth / "tls"
    (other.auth / "cluster-tls.conf").write_text("tls: " + json.dumps(
        {"cert_file": str(tls / "server.pem"), "key_file": str(tls / "server-key.pem"), "insecure": True}))
    port, monitor, route = free_port(), free_port(), free_port()
    target = nats_cluster.servers["nats-1"]
    with open(other.root / "intruder.log", "ab") as log:
        intruder = subprocess.Popen(
            [nats_server_binary(), "-c", str(other.servers["nats-1"].config), "-n", "intruder", "-a", "127.0.0.1",
             "-p", str(port), "-m", str(monitor), "--cluster", f"nats://127.0.0.1:{route}",
             "--routes", f"nats-route://127.0.0.1:{target.route_port}", "-sd", str(other.root / "store")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        async def refused() -> bool:
            return "TLS route handshake error" in nats_cluster.log("nats-1")
        await eventually(refused, 30, "nats-1 refusing the intruder's route")
        remotes = {r.get("remote_name") for r in (await nats_cluster.monitor("nats-1", "routez"))["routes"]}
        assert remotes == {"nats-2", "nats-3"}, remotes
    finally:
        intruder.kill()
        intruder.wait()
