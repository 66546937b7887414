"""What writing every JetStream message to disk at once costs, against nats-server's default (a sync every two
minutes), side by side in one run: acknowledged publishes a second into a file stream, one at a time (a
submitter waiting for each) and many in flight (services publishing events).

    .venv/bin/python tests/perf/bench_fsync.py --messages 3000

docs/security.md ("Durability") has the figures and the choice they led to.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import nats
from nats.js.api import StorageType, StreamConfig

from services.runtime import EmbeddedNats


async def rate(url: str, messages: int, in_flight: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH", subjects=["bench.>"], storage=StorageType.FILE))
    body = b"x" * 600  # about a job event
    sem = asyncio.Semaphore(in_flight)

    async def one(i: int) -> None:
        async with sem:
            await js.publish(f"bench.{i % 100}", body)
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(messages)))
    elapsed = time.perf_counter() - start
    await js.delete_stream("BENCH")
    await nc.close()
    return messages / elapsed


async def main(messages: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        for name, sync in (("default (2 min)", None), ("always", "always")):
            store = Path(tmp) / name.split()[0]
            config = None
            if sync:
                store.mkdir(parents=True)
                config = store / "nats.conf"
                config.write_text(f'jetstream: {{sync_interval: "{sync}"}}\n')
            servers[name] = EmbeddedNats(store, config=config).start()
        try:
            print(f"{'sync_interval':<18} {'one at a time':>16} {'64 in flight':>16}")
            results = {}
            for _ in range(2):  # interleaved, twice: the machine's noise falls on both alike
                for name, server in servers.items():
                    url = server.url.replace("tls://", "nats://")
                    one = await rate(url, messages // 3, 1)
                    many = await rate(url, messages, 64)
                    results.setdefault(name, []).append((one, many))
            for name, runs in results.items():
                one = sum(r[0] for r in runs) / len(runs)
                many = sum(r[1] for r in runs) / len(runs)
                print(f"{name:<18} {one:>12.0f} /s {many:>12.0f} /s")
            (d1, dm), (a1, am) = ([sum(r[i] for r in runs) / len(runs) for i in (0, 1)] for runs in results.values())
            print(f"always / default: {a1 / d1:.2f} one at a time, {am / dm:.2f} with 64 in flight")
        finally:
            for server in servers.values():
                server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    asyncio.run(main(parser.parse_args().messages))
