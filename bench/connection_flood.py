"""A flood of idle connections against a local cluster's router, while a client with the bearer token goes on
sending requests (issue 18's probe: ~21k connections that never sent their HTTP headers, from loopback addresses,
took a router to its 20,000-file limit; every client timed out and the log grew 188 MB in 50 s).

    python -m pdserve.bench.connection_flood --connections 15000 --requests 30

A 1 prefill + 1 decode cluster (`pdserve up`, a token file) is started. The client's requests (a short greedy chat
over HTTP, then a completion over gRPC) are timed first alone, then while the flood opens `--connections`
connections from 127.0.x.y addresses (as fast as it can; each held until the router closes it) and for a few seconds
after. Printed: requests served and failed, their latency (median, max) in both phases, the router's open files at
the peak and after, and how much its log grew.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import urllib.request

from pdserve.bench.local_cluster import start_cluster, stop_cluster
from pdserve.client import Client
from pdserve.engine import SamplingParams

TOKEN = "flood-bench-token"
CONFIG = {"workers": {"prefill": {"count": 1, "resources": {"cpus": 1}},
                      "decode": {"count": 1, "resources": {"cpus": 1}}}}
REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0


def chat(http_address: str) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"http://{http_address}/v1/chat/completions", body, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        json.load(response)


async def timed_requests(http_address: str, grpc_address: str, count: int,
                         until: asyncio.Task | None = None) -> tuple[list[float], int]:
    """HTTP chats and gRPC completions, one after another: `count` of them, and more until `until` is done;
    returns (latencies of those served, failures)."""
    latencies, failed = [], 0
    async with Client(grpc_address, timeout_s=REQUEST_TIMEOUT_S, token=TOKEN) as client:
        i = 0
        while i < count or (until is not None and not until.done()):
            i += 1
            began = time.monotonic()
            try:
                if i % 2 == 0:
                    await asyncio.to_thread(chat, http_address)
                else:
                    await client.generate("Hello", SamplingParams(max_tokens=4, temperature=0))
                latencies.append(time.monotonic() - began)
            except Exception as e:  # a bench counts every failure, whatever it is
                failed += 1
                print(f"  request {i} failed: {type(e).__name__}: {e}")
    return latencies, failed


async def flood(http_address: str, count: int, held: list) -> int:
    """Open `count` connections that never send a byte; returns how many the router accepted."""
    host, port = http_address.rsplit(":", 1)
    opened = 0
    for i in range(count):
        source = f"127.0.{1 + (i // 250) % 250}.{1 + i % 250}"
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port), local_addr=(source, 0)), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError):
            continue
        held.append(writer)
        opened += 1
    return opened


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def run(cluster, connections: int, requests: int) -> dict:
    state = cluster.state()
    http_address, pid = state["http_address"], state["router_pids"][0]
    log_path = os.path.join(cluster.state_dir, "cluster.log")
    await timed_requests(http_address, cluster.address, 2)  # warm up
    alone, alone_failed = await timed_requests(http_address, cluster.address, requests)
    log_before = os.path.getsize(log_path)
    held: list = []
    began = time.monotonic()
    flooding = asyncio.create_task(flood(http_address, connections, held))
    during, during_failed = await timed_requests(http_address, cluster.address, requests, flooding)
    peak_files = open_files(pid)
    opened = await flooding
    flood_s = time.monotonic() - began
    after_files = open_files(pid)
    for writer in held:
        writer.close()
    return {"connections_opened": opened, "flood_s": round(flood_s, 1),
            "alone": _summary(alone, alone_failed), "during_flood": _summary(during, during_failed),
            "router_open_files_peak": peak_files, "router_open_files_end": after_files,
            "log_growth_bytes": os.path.getsize(log_path) - log_before}


def _summary(latencies: list[float], failed: int) -> dict:
    return {"served": len(latencies), "failed": failed,
            "median_s": round(statistics.median(latencies), 3) if latencies else None,
            "max_s": round(max(latencies), 3) if latencies else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=15000)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pdserve-flood-") as folder:
        token_file = os.path.join(folder, "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        cluster = start_cluster(folder, {**CONFIG, "router": {"token_file": token_file}})
        try:
            report = asyncio.run(run(cluster, args.connections, args.requests))
        finally:
            stop_cluster(cluster)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
