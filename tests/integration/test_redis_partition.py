"""A reader cut off from Redis by the network, then reconnected.

The reader runs in a network namespace of its own, joined to this one by a veth pair; Redis listens on the pair's
address too. Setting the link down cuts the reader off without closing anything (no reset, no process change),
as a real partition does. Needs root and ``ip`` (network namespaces); skipped where they are not available.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until
from tests.integration.test_redis_faults import (
    BATCH,
    DELAY_MS,
    GROUP,
    HANG_S,
    Cluster,
    _load_one_reader,
    dead,
    failed_with,
    generate,
    live,
    served_by,
    wait_live,
    words,
)
from tests.redis_server import RedisServer


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Partition:
    """A network namespace joined to this one by a veth pair (``HOST`` here, ``PEER`` inside)."""

    def __init__(self) -> None:
        tag = os.getpid() % 10_000
        self.namespace, self.host_link, self.peer_link = f"lfp{tag}", f"lfh{tag}", f"lfn{tag}"
        subnet = os.getpid() % 250
        self.host, self.peer = f"10.231.{subnet}.1", f"10.231.{subnet}.2"

    def create(self) -> None:
        ip("netns", "add", self.namespace)
        ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.peer_link)
        ip("link", "set", self.peer_link, "netns", self.namespace)
        ip("addr", "add", f"{self.host}/30", "dev", self.host_link)
        ip("link", "set", self.host_link, "up")
        inside = (("addr", "add", f"{self.peer}/30", "dev", self.peer_link), ("link", "set", self.peer_link, "up"),
                  ("link", "set", "lo", "up"))  # fmt: skip
        for command in inside:
            ip("netns", "exec", self.namespace, "ip", *command)

    def cut(self) -> None:
        ip("link", "set", self.host_link, "down")

    def heal(self) -> None:
        ip("link", "set", self.host_link, "up")

    def remove(self) -> None:
        for args in (("netns", "del", self.namespace), ("link", "del", self.host_link)):
            subprocess.run(["ip", *args], capture_output=True, check=False)


@pytest.fixture
def partition() -> Iterator[Partition]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's ip")
    made = Partition()
    try:
        made.create()
    except subprocess.CalledProcessError as exc:
        made.remove()
        pytest.skip(f"cannot make a network namespace here: {exc.stderr.strip()}")
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture
def cluster(partition: Partition, liftoff: Any, tmp_path: Path) -> Iterator[Cluster]:
    server = RedisServer(tmp_path / "redis", bind=f"127.0.0.1 {partition.host}").start()
    made = Cluster(liftoff, server, tmp_path)
    try:
        yield made
    finally:
        made.close()
        server.stop()


def isolated_reader(cluster: Cluster, partition: Partition, reader_id: str) -> None:
    """A reader inside the namespace, reaching Redis over the veth pair."""
    url = f"redis://{partition.host}:{cluster.redis.port}/0"
    command = ["ip", "netns", "exec", partition.namespace, sys.executable, "-m", "liftoff", "reader",
               "--broker", url, "--reader-id", reader_id, "--model-name", "echo", "--device", "cpu",
               "--consumer-group", GROUP, "--max-batch-size", str(BATCH),
               "--backend-options", json.dumps({"token_delay_ms": DELAY_MS}),
               "--repository-path", str(cluster.workdir / "artefacts")]  # fmt: skip
    with (cluster.workdir / f"reader-{reader_id}.log").open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster.readers[reader_id] = process


@pytest.mark.parametrize("hold_s", [0.0, 12.0], ids=["short", "long"])
def test_a_partitioned_reader_is_declared_dead_and_comes_back_when_the_network_does(
    cluster: Cluster, partition: Partition, hold_s: float
) -> None:
    """Short: the link comes back before the reader's own Redis commands time out, and its registry entry tells it
    that it was declared dead. Long: they time out first (10 s), and it reconnects with backoff once it can."""
    isolated_reader(cluster, partition, "r1")
    a, b = cluster.gateway("a"), cluster.gateway("b")
    wait_live([a, b], {"r1"})
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        endless, finite = _load_one_reader(cluster, a, b, pool)
        cluster.reader("r2")
        cluster.reader("r3")
        wait_live([a, b], {"r1", "r2", "r3"})
        partition.cut()
        try:
            _, pending = concurrent.futures.wait([*endless, *finite], timeout=HANG_S)
            assert not pending, "a request hangs"
            for server in (a, b):
                wait_until(functools.partial(dead, server, "r1"), timeout=10, what=f"r1 dead on {server.mgmt}")
            time.sleep(hold_s)
        finally:
            partition.heal()
    # What r1 had started failed once; what it had not ran on the others, once each.
    assert [failed_with(future.result()) for future in endless] == ["reader_died", "reader_died"]
    assert {served_by(future.result()) for future in finite} <= {"r2", "r3"}
    # With the network back, r1 finds out (a lost connection, or its registry entry says dead) and registers again.
    wait_live([a, b], {"r1", "r2", "r3"}, timeout=40)
    assert cluster.readers["r1"].poll() is None
    assert ("lost Redis" if hold_s else "declared this reader dead") in cluster.log("r1")
    assert live(a) == live(b)
    results = [generate(server.base, words(f"healed{i}", 5)) for i, server in enumerate((a, b, a, b))]
    assert {served_by(result) for result in results} <= {"r1", "r2", "r3"}
    wait_until(lambda: cluster.pending() == 0, timeout=10, what="an empty pending list")
