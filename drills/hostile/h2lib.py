"""HTTP/2 and gRPC plumbing for the hostile-client drill.

`H2Client` is a small asyncio wrapper around the `h2` state machine that can
hold thousands of streams on one connection and inspect each stream's fate
(answered, reset by the server, cut by GOAWAY, still pending). `raw_*` build
frames by hand where the `h2` state machine would be too slow or too polite
(rapid reset). The probe loops at the bottom run in their own process, so
that the attacker's busy event loop does not inflate the victim's latency.
"""

import asyncio
import collections
import time
import urllib.parse

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

HOST = "127.0.0.1"
UNLIMITED = 2**31  # h2 reports "no limit" as 2**32 + 1

# ---------------------------------------------------------------- gRPC bits


def grpc_frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def pb_string(field: int, value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    out = bytes([(field << 3) | 2])
    n = len(raw)
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out += bytes([byte | 0x80])
        else:
            out += bytes([byte])
            break
    return out + raw


def assign_mailbox(handle: str, mailbox_id: str) -> bytes:
    return grpc_frame(pb_string(1, handle) + pb_string(2, mailbox_id))


def unassign_mailbox(handle: str) -> bytes:
    return grpc_frame(pb_string(1, handle))


EMPTY_MESSAGE = grpc_frame(b"")  # 00 00000000: HealthCheckRequest{service: ""}

SVC = "/channels.v1.ChannelAssignment/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


def grpc_headers(authority: str, path: str, token: str | None = None, extra=()):
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("user-agent", "hostile-drill/1"),
    ]
    if token:
        headers.append(("authorization", "Bearer " + token))
    headers.extend(extra)
    return headers


# ---------------------------------------------------------------- h2 client


class Stream:
    __slots__ = (
        "sid", "t0", "t_headers", "t_end", "headers", "trailers", "data",
        "ndata", "reset", "outcome", "fut", "pending_body", "end_after_body",
    )

    def __init__(self, sid: int):
        self.sid = sid
        self.t0 = time.monotonic()
        self.t_headers = None
        self.t_end = None
        self.headers = None
        self.trailers = None
        self.data = bytearray()
        self.ndata = 0
        self.reset = None  # error code of a server RST_STREAM
        self.outcome = None  # None while open; "ended" | "reset" | "goaway" | "closed"
        self.fut = None
        self.pending_body = b""
        self.end_after_body = False

    # gRPC view of the stream
    def meta(self, name: str):
        for block in (self.trailers, self.headers):
            if block and name in block:
                return block[name]
        return None

    @property
    def grpc_status(self):
        value = self.meta("grpc-status")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def grpc_message(self):
        value = self.meta("grpc-message")
        return urllib.parse.unquote(value) if value is not None else None

    @property
    def has_details(self):
        return self.meta("grpc-status-details-bin") is not None

    def label(self) -> str:
        """One word for what happened to this call."""
        if self.grpc_status is not None:
            return str(self.grpc_status)
        if self.reset is not None:
            return "rst:" + _code_name(self.reset)
        if self.outcome in ("goaway", "closed"):
            return self.outcome
        if self.outcome == "ended":
            return "no-status"
        return "pending"


def _code_name(code) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


class H2Client:
    """One HTTP/2 connection; streams are tracked until the connection ends."""

    def __init__(self, port: int, host: str = HOST, keep_data: int = 65536):
        self.host, self.port = host, port
        self.authority = f"{host}:{port}"
        self.keep_data = keep_data
        self.streams: dict[int, Stream] = {}
        self.settings = asyncio.Event()
        self.closed = asyncio.Event()
        self.max_streams = None
        self.goaway = None  # (error code name, last stream id, debug data, monotonic time)
        self.close_reason = None
        self.t_closed = None
        self.writer = None
        self._task = None
        self._window_waiters = False
        self.refused = 0
        self.server_resets = collections.Counter()

    async def connect(self, timeout: float = 5.0) -> "H2Client":
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), timeout)
        config = h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8",
            validate_inbound_headers=False)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.conn.update_settings({SettingCodes.ENABLE_PUSH: 0,
                                   SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        self.conn.increment_flow_control_window(1 << 30)
        self.flush()
        self._task = asyncio.create_task(self._read_loop())
        try:
            await asyncio.wait_for(self.settings.wait(), timeout)
        except BaseException:
            self.abort()
            raise
        if self.closed.is_set():
            raise ConnectionError(self.close_reason or "closed during handshake")
        return self

    def flush(self):
        data = self.conn.data_to_send()
        if data and self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self):
        self.flush()
        if self.writer is not None and not self.writer.is_closing():
            try:
                await self.writer.drain()
            except (ConnectionError, OSError):
                pass

    def can_open(self) -> bool:
        return (not self.closed.is_set() and self.goaway is None
                and self.conn.open_outbound_streams < self.conn.remote_settings.max_concurrent_streams)

    def ignore_stream_limit(self):
        """Let h2 open streams beyond the server's advertised limit (to see
        whether it really refuses them)."""
        self.conn.remote_settings._settings[SettingCodes.MAX_CONCURRENT_STREAMS] = \
            collections.deque([2**31 - 1])

    def open_stream(self, headers, body: bytes | None = None, end: bool = True,
                    want_future: bool = False) -> Stream:
        sid = self.conn.get_next_available_stream_id()
        stream = Stream(sid)
        if want_future:
            stream.fut = asyncio.get_running_loop().create_future()
        self.streams[sid] = stream
        self.conn.send_headers(sid, headers, end_stream=(body is None and end))
        if body is not None:
            stream.pending_body = body
            stream.end_after_body = end
            self._send_pending(stream)
        return stream

    def reset_stream(self, stream: Stream, code=ErrorCodes.CANCEL):
        try:
            self.conn.reset_stream(stream.sid, code)
        except h2.exceptions.H2Error:
            pass

    def _send_pending(self, stream: Stream):
        while stream.pending_body:
            try:
                window = self.conn.local_flow_control_window(stream.sid)
            except h2.exceptions.H2Error:
                stream.pending_body = b""
                return
            size = min(window, self.conn.max_outbound_frame_size, len(stream.pending_body))
            if size <= 0:
                return
            chunk, stream.pending_body = stream.pending_body[:size], stream.pending_body[size:]
            last = not stream.pending_body and stream.end_after_body
            self.conn.send_data(stream.sid, chunk, end_stream=last)

    def _finish(self, stream: Stream, outcome: str):
        if stream.outcome is None:
            stream.outcome = outcome
            stream.t_end = time.monotonic()
            if stream.fut is not None and not stream.fut.done():
                stream.fut.set_result(stream)

    async def _read_loop(self):
        try:
            while True:
                data = await self.reader.read(1 << 18)
                if not data:
                    self.close_reason = self.close_reason or "eof"
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as error:
                    self.close_reason = f"protocol error: {error}"
                    break
                for event in events:
                    self._on_event(event)
                self.flush()
        except (ConnectionError, OSError) as error:
            self.close_reason = self.close_reason or type(error).__name__
        except asyncio.CancelledError:
            self.close_reason = self.close_reason or "closed by us"
        finally:
            self.t_closed = time.monotonic()
            self.closed.set()
            self.settings.set()  # a close during the handshake ends connect() at once
            for stream in self.streams.values():
                self._finish(stream, "closed")
            if self.writer is not None:
                self.writer.close()

    def _on_event(self, event):
        streams = self.streams
        if isinstance(event, h2.events.DataReceived):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream.ndata += len(event.data)
                if len(stream.data) < self.keep_data:
                    stream.data += event.data[: self.keep_data - len(stream.data)]
            try:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            except h2.exceptions.H2Error:
                pass
        elif isinstance(event, h2.events.ResponseReceived):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream.headers = dict(event.headers)
                stream.t_headers = time.monotonic()
        elif isinstance(event, h2.events.TrailersReceived):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = dict(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            stream = streams.get(event.stream_id)
            if stream is not None:
                self._finish(stream, "ended")
        elif isinstance(event, h2.events.StreamReset):
            stream = streams.get(event.stream_id)
            if event.remote_reset:
                self.server_resets[_code_name(event.error_code)] += 1
                if event.error_code == ErrorCodes.REFUSED_STREAM:
                    self.refused += 1
            if stream is not None and stream.outcome is None:
                if event.remote_reset:
                    stream.reset = event.error_code
                self._finish(stream, "reset")
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = (_code_name(event.error_code), event.last_stream_id,
                           (event.additional_data or b"")[:100], time.monotonic())
            last = event.last_stream_id if event.last_stream_id is not None else 0
            for sid, stream in streams.items():
                if sid > last:
                    self._finish(stream, "goaway")
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.max_streams = self.conn.remote_settings.max_concurrent_streams
            self.settings.set()
        elif isinstance(event, h2.events.WindowUpdated):
            for stream in streams.values():
                if stream.pending_body:
                    self._send_pending(stream)

    def abort(self):
        if self._task is not None:
            self._task.cancel()
        if self.writer is not None:
            self.writer.close()

    async def close(self):
        if self.writer is not None and not self.closed.is_set():
            try:
                self.conn.close_connection()
                self.flush()
            except h2.exceptions.H2Error:
                pass
        self.abort()
        if self._task is not None:
            try:
                await self._task
            except BaseException:
                pass

    async def unary(self, path: str, body: bytes, token: str | None = None,
                    timeout: float = 10.0, extra=()) -> Stream:
        stream = self.open_stream(grpc_headers(self.authority, path, token, extra), body,
                                  want_future=True)
        self.flush()
        try:
            await asyncio.wait_for(asyncio.shield(stream.fut), timeout)
        except asyncio.TimeoutError:
            if stream.outcome is None:
                stream.outcome = "timeout"
                self.reset_stream(stream)
                self.flush()
        return stream


def stream_label(stream: Stream) -> str:
    return "timeout" if stream.outcome == "timeout" else stream.label()


# ---------------------------------------------------------------- raw frames

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def raw_frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


def stateless_header_block(headers) -> bytes:
    """A header block that uses no dynamic table, so the same bytes can open
    any number of streams."""
    encoder = hpack.Encoder()
    return encoder.encode([(name, value, True) for name, value in headers], huffman=True)


class RawConn:
    """Writes pre-built frames; reads just enough to stay a polite peer
    (SETTINGS/PING acks) and to count what the server says."""

    def __init__(self, port: int, host: str = HOST):
        self.host, self.port = host, port
        self.settings = asyncio.Event()
        self.closed = asyncio.Event()
        self.goaway = None
        self.resets = collections.Counter()
        self.headers = 0
        self.data_bytes = 0
        self.writer = None
        self._task = None

    async def connect(self, timeout: float = 5.0):
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), timeout)
        self.writer.write(PREFACE + raw_frame(SETTINGS, 0, 0)
                          + raw_frame(WINDOW_UPDATE, 0, 0, (1 << 30).to_bytes(4, "big")))
        self._task = asyncio.create_task(self._read_loop())
        await asyncio.wait_for(self.settings.wait(), timeout)
        return self

    async def _read_loop(self):
        buf = bytearray()
        try:
            while True:
                data = await self.reader.read(1 << 18)
                if not data:
                    break
                buf += data
                pos = 0
                while len(buf) - pos >= 9:
                    length = int.from_bytes(buf[pos:pos + 3], "big")
                    if len(buf) - pos < 9 + length:
                        break
                    kind, flags = buf[pos + 3], buf[pos + 4]
                    payload = bytes(buf[pos + 9:pos + 9 + length])
                    pos += 9 + length
                    if kind == SETTINGS and not flags & ACK:
                        self.writer.write(raw_frame(SETTINGS, ACK, 0))
                        self.settings.set()
                    elif kind == PING and not flags & ACK:
                        self.writer.write(raw_frame(PING, ACK, 0, payload))
                    elif kind == GOAWAY:
                        code = int.from_bytes(payload[4:8], "big")
                        self.goaway = (_code_name(code), int.from_bytes(payload[0:4], "big") & 0x7FFFFFFF,
                                       payload[8:108])
                    elif kind == RST_STREAM:
                        self.resets[_code_name(int.from_bytes(payload[0:4], "big"))] += 1
                    elif kind == HEADERS:
                        self.headers += 1
                    elif kind == DATA:
                        self.data_bytes += length
                del buf[:pos]
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self.closed.set()
            self.settings.set()
            if self.writer is not None:
                self.writer.close()

    def close(self):
        if self._task is not None:
            self._task.cancel()
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------- victim probes
# These run in a separate (spawned) process and send their results back.


async def _health_fresh(port: int, timeout: float):
    """A normal client: new connection, handshake, one Health/Check."""
    t0 = time.monotonic()
    client = H2Client(port)
    try:
        await client.connect(timeout)
        stream = await client.unary(HEALTH_CHECK, EMPTY_MESSAGE, timeout=max(0.1, timeout - (time.monotonic() - t0)))
        label = stream_label(stream)
    except asyncio.TimeoutError:
        label = "connect-timeout"
    except (ConnectionError, OSError) as error:
        label = "connect-" + type(error).__name__
    finally:
        await client.close()
    return label, (time.monotonic() - t0) * 1000.0


async def _probe_loop(spec: dict, should_stop=lambda: False):
    """Open loop: one call every `interval` s for `duration` s (bounded count)."""
    port, interval, duration = spec["port"], spec["interval"], spec["duration"]
    timeout = spec.get("timeout", 5.0)
    kind = spec["kind"]
    results = []
    shared = {"client": None}
    lock = asyncio.Lock()

    async def client():
        async with lock:
            current = shared["client"]
            if current is None or current.closed.is_set() or current.goaway is not None:
                if current is not None:
                    await current.close()
                shared["client"] = None
                current = await H2Client(port).connect(timeout)
                shared["client"] = current
            return current

    async def one(t_wall: float):
        t0 = time.monotonic()
        if kind == "health":
            label, ms = await _health_fresh(port, timeout)
        else:  # unary call on a kept connection, like a real client
            try:
                c = await client()
                stream = await c.unary(SVC + spec["method"], spec["body"], spec["token"],
                                       timeout=max(0.1, timeout - (time.monotonic() - t0)))
                label = stream_label(stream)
            except asyncio.TimeoutError:
                label = "connect-timeout"
            except (ConnectionError, OSError) as error:
                label = "connect-" + type(error).__name__
            ms = (time.monotonic() - t0) * 1000.0
        results.append((t_wall, label, ms))

    start = time.monotonic()
    wall0 = time.time()
    tasks = []
    count = int(duration / interval)
    for i in range(count):
        if should_stop():
            break
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(wall0 + i * interval)))
    if tasks:
        await asyncio.wait(tasks, timeout=timeout + 2)
    if shared["client"] is not None:
        await shared["client"].close()
    return results


def probe_process(spec: dict, conn):
    """Entry point of the probe process: waits for the go signal, then runs."""
    conn.recv()  # go
    try:
        results = asyncio.run(_probe_loop(spec, conn.poll))
    except Exception as error:  # report, never hang the drill
        results = [(time.time(), "probe-crashed:" + repr(error)[:80], 0.0)]
    conn.send(results)
    conn.close()
