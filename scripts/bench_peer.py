#!/usr/bin/env python3
"""The peer tickfleet is measured against: a plain Python consumer (confluent-kafka + redis-py), the
stack the original challenge texts used, storing the same ticks the same way.

It consumes the topic in its own consumer group, decodes each protobuf tick, and per batch of up to
1000 messages sends one redis-py pipeline (ZADD NX into the asset's sorted set with the same member
encoding as tickfleet, and SET of the latest tick), then commits the offsets synchronously — the same
"commit after store" rule. It is timed from its first batch to the last commit and prints JSON.
"""

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time

import redis
from confluent_kafka import Consumer


def load_tick_class(proto_dir):
    """Compiles tick.proto with grpcio-tools' bundled protoc and returns the Tick message class."""
    out = tempfile.mkdtemp()
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out}",
         "tickfleet/v1/tick.proto"],
        check=True,
    )
    sys.path.insert(0, out)
    return importlib.import_module("tickfleet.v1.tick_pb2").Tick


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--brokers", required=True)
    p.add_argument("--topic", default="bench")
    p.add_argument("--redis", required=True)
    p.add_argument("--prefix", default="peer")
    p.add_argument("--group", default="python-peer")
    p.add_argument("--expect", type=int, required=True, help="messages to consume before stopping")
    p.add_argument("--proto-dir", default="proto/proto")
    a = p.parse_args()

    Tick = load_tick_class(a.proto_dir)
    consumer = Consumer({
        "bootstrap.servers": a.brokers,
        "group.id": a.group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
    })
    consumer.subscribe([a.topic])
    store = redis.Redis.from_url(a.redis)
    done, started = 0, None
    tick = Tick()
    deadline = time.monotonic() + 1800
    while done < a.expect and time.monotonic() < deadline:
        messages = consumer.consume(num_messages=1000, timeout=1.0)
        if not messages:
            continue
        if started is None:
            started = time.monotonic()
        pipe = store.pipeline(transaction=False)
        for m in messages:
            if m.error():
                continue
            tick.ParseFromString(m.value())
            size = tick.size if tick.HasField("size") else ""
            member = f"{tick.event_time_ns:019d}{tick.seq:020d}|{tick.price}|{size}|{tick.source}"
            tag = f"{a.prefix}:{{{tick.asset_id}}}"
            pipe.zadd(f"{tag}:ticks", {member: tick.event_time_ns // 1000}, nx=True)
            pipe.set(f"{tag}:latest", member)
        pipe.execute()
        consumer.commit(asynchronous=False)
        done += len(messages)
    seconds = time.monotonic() - (started or time.monotonic())
    consumer.close()
    print(json.dumps({"ticks": done, "seconds": seconds, "ticks_per_second": done / max(seconds, 1e-9)}))
    return 0 if done >= a.expect else 1


if __name__ == "__main__":
    sys.exit(main())
