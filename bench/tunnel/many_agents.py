"""Load generator: N agents' control streams (each on its own TLS connection) against one gateway.

    python -m bench.tunnel.many_agents TARGET CA_PATH TOKEN N

Prints "connected N" once every stream is registered, then answers pings until killed.

Each agent sends what koinon_agent sends once its Ray node runs (Agent._heartbeat): its GPUs and
agent version at Join and Register, and in every heartbeat its GPU list, Ray node id and Ray state,
which the gateway parses each time (NodeSession.record_heartbeat). A lighter heartbeat would
understate the gateway's CPU.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from pathlib import Path

import grpc
from koinon_agent.config import VERSION
from koinon_gateway.rpc import EOF, tunnel_stub
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

# A typical volunteer: two 24 GiB cards, as NVML names them.
GPUS = (pb.Gpu(model="NVIDIA GeForce RTX 4090", memory_mib=24564),) * 2


def ray_node_id(index: int) -> str:
    """A Ray node id of the real length (28 bytes, 56 hex digits), distinct per agent."""
    return hashlib.sha256(f"load-{index}".encode()).hexdigest()[:56]


def heartbeat_message(node_id: str, ping: pb.Ping | None) -> pb.Heartbeat:
    """The heartbeat koinon_agent sends while its Ray node runs (Agent._heartbeat)."""
    beat = pb.Heartbeat(ray_node_id=node_id, ray_state="running", gpus=GPUS)
    if ping is not None:
        beat.seq, beat.echo_seq, beat.echo_gateway_time_ns = ping.seq, ping.seq, ping.gateway_time_ns
    return beat


async def one_agent(target: str, ca: bytes, token: str, index: int, registered: asyncio.Event) -> None:
    channel = grpc.aio.secure_channel(
        target, grpc.ssl_channel_credentials(ca), options=[("grpc.ssl_target_name_override", "koinon-gateway")]
    )
    stub = tunnel_stub(channel)
    joined = await stub.Join(
        pb.JoinRequest(token=token, name_hint=f"load-{index}", gpus=GPUS, agent_version=VERSION), timeout=120
    )
    call = stub.Control(metadata=(("authorization", f"Bearer {joined.credential}"),))
    await call.write(
        pb.AgentMessage(
            register=pb.Register(
                node_name=joined.assignment.node_name,
                address=joined.assignment.address,
                gpus=GPUS,
                agent_version=VERSION,
                self_heartbeats=True,
            )
        )
    )
    first = await call.read()
    assert first.HasField("registered")
    registered.set()
    # As koinon_agent does: a heartbeat every interval, where an answer to a ping counts as one.
    interval = first.registered.assignment.heartbeat_interval_ms / 1000
    last_sent = asyncio.get_running_loop().time()
    lock = asyncio.Lock()
    node_id = ray_node_id(index)

    async def heartbeat(ping: pb.Ping | None) -> None:
        nonlocal last_sent
        async with lock:
            await call.write(pb.AgentMessage(heartbeat=heartbeat_message(node_id, ping)))
        last_sent = asyncio.get_running_loop().time()

    async def own_heartbeats() -> None:
        while True:
            await asyncio.sleep(max(0.0, last_sent + interval - asyncio.get_running_loop().time()))
            if asyncio.get_running_loop().time() - last_sent >= interval:
                await heartbeat(None)

    beats = asyncio.ensure_future(own_heartbeats())
    try:
        while True:
            message = await call.read()
            if message is EOF:
                return
            if message.HasField("ping"):
                await heartbeat(message.ping)
    finally:
        beats.cancel()


async def main(target: str, ca_path: str, token: str, count: int) -> None:
    ca = Path(ca_path).read_bytes()
    burst = asyncio.Semaphore(50)  # bounded join burst, like agents coming online over time
    connected = 0
    all_connected = asyncio.Event()

    async def start(index: int) -> None:
        nonlocal connected
        registered = asyncio.Event()
        async with burst:
            task = asyncio.ensure_future(one_agent(target, ca, token, index, registered))
            waiter = asyncio.ensure_future(registered.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        if registered.is_set():
            connected += 1
            if connected == count:
                all_connected.set()
        await task

    tasks = [asyncio.ensure_future(start(i)) for i in range(count)]
    await all_connected.wait()
    print(f"connected {connected}", flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
