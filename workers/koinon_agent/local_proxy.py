"""The agent's side of proxied connections.

* ``LocalProxy``: an HTTP CONNECT proxy on the volunteer (Ray's gRPC uses it through grpc_proxy);
  each CONNECT becomes a Connect stream that starts with a Dial.
* ``accept_connection``: answers the gateway's OpenConnection by connecting to the node's own Ray
  port and opening a Connect stream that starts with an Accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc
from koinon_gateway import http_connect
from koinon_gateway.frame_codec import FrameDecodeError
from koinon_gateway.rpc import EOF
from koinon_gateway.tcp_pipe import CLOSE_FLUSH_TIMEOUT_S
from koinon_gateway.tunnel_io import STREAM_READER_LIMIT, GrpcFrameChannel, ProtocolViolation, splice_tcp
from koinon_proto.tunnel.v1 import tunnel_pb2 as pb

log = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str], ...]


class LocalProxy:
    def __init__(self, stub_factory: Callable[[], Any], metadata: Callable[[], Metadata | None]) -> None:
        """``metadata`` gives the node's credential for each new connection; None before the node
        has one (such connections are answered 503)."""
        self._stub_factory = stub_factory
        self._metadata = metadata
        self._server: asyncio.Server | None = None
        self.port = 0
        self.refused = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, limit=http_connect.REQUEST_READER_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            host, port = await http_connect.read_connect_request(reader)
        except http_connect.BadConnectRequest as exc:
            log.warning("local proxy: %s", exc)
            with contextlib.suppress(Exception):
                http_connect.send(writer, http_connect.response(400, "Bad Request"))
                writer.close()
            return
        metadata = self._metadata()
        if metadata is None:
            with contextlib.suppress(Exception):
                http_connect.send(writer, http_connect.response(503, "not-joined-yet"))
                writer.close()
            return
        call = self._stub_factory().Connect(metadata=metadata)
        established = clean = False
        try:
            channel = GrpcFrameChannel(call)
            await channel.write_frame(pb.Frame(dial=pb.Dial(host=host, port=port)))
            result = await channel.read_frame()
            if (
                not isinstance(result, pb.Frame)
                or result.WhichOneof("msg") != "dial_result"
                or not result.dial_result.ok
            ):
                reason = result.dial_result.reason if isinstance(result, pb.Frame) else "tunnel-closed"
                self.refused += 1
                log.info("dial %r:%d refused by gateway: %r", host, port, reason[:256])
                status = 403 if reason.startswith("forbidden") else 502
                http_connect.send(writer, http_connect.response(status, reason or "refused"))
                await writer.drain()
                writer.close()
                return
            http_connect.send(writer, http_connect.ESTABLISHED)
            established = True
            await writer.drain()
            clean = await splice_tcp(reader, writer, channel)
        except (grpc.aio.AioRpcError, ConnectionError, ProtocolViolation, FrameDecodeError) as exc:
            log.debug("proxied connection to %r:%d ended: %r", host, port, exc)
            with contextlib.suppress(Exception):
                if not established and isinstance(exc, grpc.aio.AioRpcError):
                    # The gateway refused the stream itself (too many connections, no session).
                    self.refused += 1
                    http_connect.send(writer, http_connect.response(502, exc.code().name.lower().replace("_", "-")))
                writer.close()
        finally:
            await end_call(call, clean)


async def accept_connection(stub: Any, metadata: Metadata, request: pb.OpenConnection, local_host: str) -> None:
    """Connects to this node's own Ray port and splices it to a new Accept stream."""
    call = stub.Connect(metadata=metadata)
    channel = GrpcFrameChannel(call)
    clean = False
    try:
        await channel.write_frame(pb.Frame(accept=pb.Accept(connection_id=request.connection_id)))
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(local_host, request.port, limit=STREAM_READER_LIMIT), 5.0
            )
        except (OSError, TimeoutError) as exc:
            await channel.write_frame(
                pb.Frame(dial_result=pb.DialResult(ok=False, reason="unreachable", message=repr(exc)))
            )
            # Wait for the gateway to read it and end the call: cancelling at once may reset the
            # stream before the gateway has read the refusal, and the dialer then waits for
            # accept_timeout_s instead of hearing "unreachable" now.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_half_close_and_wait(call), CLOSE_FLUSH_TIMEOUT_S)
            return
        try:
            await channel.write_frame(pb.Frame(dial_result=pb.DialResult(ok=True)))
        except BaseException:
            writer.close()  # splice_tcp never took it over
            raise
        clean = await splice_tcp(reader, writer, channel)
    except (grpc.aio.AioRpcError, ProtocolViolation, FrameDecodeError, asyncio.InvalidStateError) as exc:
        # InvalidStateError: grpc.aio refuses writes to a call the gateway has already finished
        # (it restarted, revoked the node, or no longer knew the connection).
        log.debug("accepted connection %d ended: %r", request.connection_id, exc)
    finally:
        await end_call(call, clean)


async def end_call(call: Any, clean: bool) -> None:
    """Ends a Connect call. After a clean splice the gateway may still be delivering what this
    side sent last: cancelling now would reset the stream and cut that off, so half-close and wait
    for the gateway to finish (up to the time a socket gets to flush on close)."""
    try:
        if clean:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_half_close_and_wait(call), CLOSE_FLUSH_TIMEOUT_S)
    finally:
        if not call.done():
            call.cancel()


async def _half_close_and_wait(call: Any) -> None:
    await call.done_writing()
    while await call.read() is not EOF:
        pass  # a late Close: grpc.aio gives out the status only once earlier messages were read
    await call.code()
