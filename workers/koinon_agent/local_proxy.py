"""The agent's side of proxied connections.

* ``LocalProxy``: an HTTP CONNECT proxy on the volunteer (Ray's gRPC uses it through grpc_proxy);
  each CONNECT becomes a Connect stream that starts with a Dial.
* ``accept_connection``: answers the gateway's OpenConnection by connecting to the node's own Ray
  port and opening a Connect stream that starts with an Accept.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hmac
import logging
import secrets
import time
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

# The proxy listens on 127.0.0.1, where every local user's processes can reach it; each connection
# it takes dials into the cluster as this node. So a client must prove it was handed the proxy's
# URL (Ray gets it in its environment, which /proc keeps to this user): gRPC sends the URL's
# userinfo as ``Proxy-Authorization: Basic base64(user:password)``.
PROXY_USER = "koinon"
PROXY_AUTH_REQUIRED = (
    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
    b'Proxy-Authenticate: Basic realm="koinon"\r\n'
    b"Content-Length: 0\r\n\r\n"
)
# Local connections served at once, counting those still sending their request: it bounds the
# sockets a local process that floods the port can make the agent hold. Ray uses far fewer: the
# gateway lets a node dial at most --max-streams-per-node (256 by default) at once, and a node of
# test_ray_netns.py (tasks, actors, 80 MB objects between two volunteers) peaks at about 20.
MAX_LOCAL_CONNECTIONS = 1024
# Connections still sending their request (not yet shown the secret) held at once; a newcomer
# beyond this pushes out the oldest, once that one has had PUSH_OUT_AFTER_S to send it.
MAX_UNAUTHENTICATED_CONNECTIONS = 64
PUSH_OUT_AFTER_S = 1.0
# Refusals of local clients are logged at most this often (a local flood must not flood the log).
REFUSAL_LOG_INTERVAL_S = 60.0


def new_secret() -> str:
    return secrets.token_hex(16)


class LocalProxy:
    def __init__(
        self,
        stub_factory: Callable[[], Any],
        metadata: Callable[[], Metadata | None],
        secret: str = "",
        max_connections: int = MAX_LOCAL_CONNECTIONS,
    ) -> None:
        """``metadata`` gives the node's credential for each new connection; None before the node
        has one (such connections are answered 503). ``secret``: the password clients must send
        (default: a new random one)."""
        self._stub_factory = stub_factory
        self._metadata = metadata
        self._secret = secret or new_secret()
        self._expected = f"{PROXY_USER}:{self._secret}".encode()
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self.port = 0
        self.refused = 0  # dials the gateway refused
        # Local clients turned away, by why (_refuse); never with what they sent as credentials.
        self.refused_local: collections.Counter[str] = collections.Counter()
        self.active = 0  # authenticated local connections being served
        self.max_unauthenticated = MAX_UNAUTHENTICATED_CONNECTIONS
        # Connections still sending their request, oldest first (a dict keeps insertion order),
        # with when each arrived (monotonic); and those pushed out whose handler has not ended yet.
        self._unauthenticated: dict[asyncio.StreamWriter, float] = {}
        self._pushed_out: set[asyncio.StreamWriter] = set()
        self._refusals_logged_at = -REFUSAL_LOG_INTERVAL_S

    def __repr__(self) -> str:
        return f"LocalProxy(127.0.0.1:{self.port})"  # never the secret

    @property
    def url(self) -> str:
        """The proxy URL with its credentials, for Ray's environment only: never log it, nor put it
        on a command line."""
        return f"http://{PROXY_USER}:{self._secret}@127.0.0.1:{self.port}"

    @property
    def authorization(self) -> str:
        """The Proxy-Authorization value a client sends (what gRPC makes of ``url``)."""
        return "Basic " + base64.b64encode(self._expected).decode()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, host, port, limit=http_connect.REQUEST_READER_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def _authorized(self, values: tuple[str, ...]) -> bool:
        if len(values) != 1:
            return False
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            presented = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(presented, self._expected)

    def _refuse(self, why: str) -> None:
        """Counts a local client turned away (``why``: bad-request, unauthorized, over-capacity,
        pushed-out) and logs it with the counts so far, at most once per REFUSAL_LOG_INTERVAL_S: a
        local flood must not flood the log. (Not the gateway's LimitedLog: its summaries point to
        /metrics, which the agent has not.)"""
        self.refused_local[why] += 1
        now = time.monotonic()
        if now - self._refusals_logged_at >= REFUSAL_LOG_INTERVAL_S:
            self._refusals_logged_at = now
            counts = ", ".join(f"{count} {reason}" for reason, count in sorted(self.refused_local.items()))
            log.warning("local proxy: refused a local client (%s); refused so far: %s", why, counts)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Until it has shown the secret a connection is a stranger's as much as Ray's: strangers
        # must not fill the slots Ray needs. So those still sending their request have a pool of
        # their own, and only authenticated connections count against max_connections. In a full
        # pool a newcomer pushes out the oldest once that one has had PUSH_OUT_AFTER_S to send its
        # request (Ray's gRPC sends it right after connecting, an idle stranger waits out the
        # request timeout); a burst of young connections (Ray's own, at start) is let in, up to
        # four times the pool, so that none of Ray's is pushed out before it could be read.
        if len(self._unauthenticated) >= self.max_unauthenticated:
            oldest, since = next(iter(self._unauthenticated.items()))
            if time.monotonic() - since >= PUSH_OUT_AFTER_S:
                self._unauthenticated.pop(oldest)
                self._pushed_out.add(oldest)
                self._refuse("pushed-out")
                oldest.transport.abort()
            elif len(self._unauthenticated) >= 4 * self.max_unauthenticated:
                self._refuse("over-capacity")
                with contextlib.suppress(Exception):
                    http_connect.send(writer, http_connect.response(503, "too-many-connections"))
                    writer.close()
                return
        self._unauthenticated[writer] = time.monotonic()
        try:
            request = await self._read_request(reader, writer)
        finally:
            self._unauthenticated.pop(writer, None)
            self._pushed_out.discard(writer)
        if request is None:
            return
        if self.active >= self.max_connections:
            self._refuse("over-capacity")
            with contextlib.suppress(Exception):
                http_connect.send(writer, http_connect.response(503, "too-many-connections"))
                writer.close()
            return
        self.active += 1
        try:
            await self._serve(request, reader, writer)
        finally:
            self.active -= 1

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> http_connect.ConnectRequest | None:
        """The client's CONNECT request once it has shown the secret; None (answered) otherwise."""
        try:
            request = await http_connect.read_connect_request(reader)
        except (http_connect.BadConnectRequest, ConnectionError) as exc:
            log.debug("local proxy: %s", exc)
            if writer in self._pushed_out:
                return None  # counted as pushed out already
            self._refuse("bad-request")
            with contextlib.suppress(Exception):
                http_connect.send(writer, http_connect.response(400, "Bad Request"))
                writer.close()
            return None
        # Before anything else is said: a client without the credentials learns nothing of the node.
        if not self._authorized(request.proxy_authorization):
            self._refuse("unauthorized")
            with contextlib.suppress(Exception):
                http_connect.send(writer, PROXY_AUTH_REQUIRED)
                writer.close()
            return None
        return request

    async def _serve(
        self, request: http_connect.ConnectRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        host, port = request.host, request.port
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
