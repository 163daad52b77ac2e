"""Hostile-client drill for channel-assignment: runs each attack against a
fresh server process, samples the server's RSS / fds / CPU / stderr while it
runs, and prints one table. See `run --help`.
"""

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.request

import h2lib
from h2lib import (EMPTY_MESSAGE, HEALTH_CHECK, HEALTH_WATCH, SVC, UNLIMITED, H2Client,
                   RawConn, assign_mailbox, grpc_headers, raw_frame, stream_label,
                   unassign_mailbox)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "target", "hostile")
DB_NAME = os.environ.get("HOSTILE_DB", "hostile_drill")
DB_ADMIN = "postgres://postgres@127.0.0.1:5432/postgres"
DB_URL = f"postgres://postgres@127.0.0.1:5432/{DB_NAME}"
SECRET = "hostile-drill-secret-0123456789abcdef-0123456789"
ORG_A, ORG_B = "hostile_org_a", "hostile_org_b"
# Seconds between the end of an attack and the "after" sample: the server hands
# freed memory back every 5 s.
AFTER_WAIT = float(os.environ.get("AFTER_WAIT", "12"))

SEED_SQL = f"""
INSERT INTO mailboxes (organization_id, id, email_address)
SELECT '{ORG_A}', ('0a000000-0000-4000-8000-' || lpad(i::text, 12, '0'))::uuid, 'flood' || i || '@example.com'
FROM generate_series(0, 49) AS i;
INSERT INTO identities (organization_id, agent_handle, mailbox_id)
SELECT '{ORG_A}', 'flood-' || i, ('0a000000-0000-4000-8000-' || lpad(i::text, 12, '0'))::uuid
FROM generate_series(0, 49) AS i;
INSERT INTO mailboxes (organization_id, id, email_address)
SELECT '{ORG_B}', ('0b000000-0000-4000-8000-' || lpad(i::text, 12, '0'))::uuid, 'b' || i || '@example.com'
FROM generate_series(0, 4) AS i;
INSERT INTO identities (organization_id, agent_handle)
SELECT '{ORG_B}', 'b-agent-' || i FROM generate_series(0, 4) AS i;
"""


def mailbox_a(i: int) -> str:
    return f"0a000000-0000-4000-8000-{i:012d}"


def log(message: str):
    print(f"[hostile {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def fmt_ms(value):
    return "-" if value is None else (f"{value:.0f}" if value >= 10 else f"{value:.1f}")


def fmt_counter(counter, limit=6):
    items = counter.most_common()
    text = " ".join(f"{k}:{v}" for k, v in items[:limit])
    if len(items) > limit:
        text += f" +{len(items) - limit} more"
    return text or "none"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- database and server


def psql(database: str, sql: str):
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", database, "-v",
                    "ON_ERROR_STOP=1", "-q", "-X"], input=sql.encode(), check=True,
                   stdout=subprocess.DEVNULL)


def prepare_database(binary: str):
    psql("postgres", f'SET client_min_messages = warning; DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE);')
    psql("postgres", f'CREATE DATABASE "{DB_NAME}";')
    subprocess.run([binary, "migrate"], env={**os.environ, "DATABASE_URL": DB_URL},
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    psql(DB_NAME, SEED_SQL)


def mint_token(binary: str, org: str) -> str:
    out = subprocess.run([binary, "token", "--org-id", org, "--ttl", "3h",
                          "--auth-jwt-hs256-secret", SECRET],
                         check=True, capture_output=True, env={**os.environ, "AUTH_JWT_HS256_SECRET": SECRET})
    return out.stdout.decode().strip()


class Server:
    def __init__(self, binary: str, name: str):
        self.binary = binary
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = os.path.join(OUT, f"{name}.stderr.log")
        self.proc = None

    def start(self):
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        if os.environ.get("SERVER_RUST_LOG"):
            env["RUST_LOG"] = os.environ["SERVER_RUST_LOG"]
        env.update({
            "DATABASE_URL": DB_URL,
            "GRPC_LISTEN_ADDR": f"127.0.0.1:{self.port}",
            "METRICS_LISTEN_ADDR": f"127.0.0.1:{self.metrics_port}",
            # The REST listener is not under attack here; off the default port.
            "HTTP_LISTEN_ADDR": "127.0.0.1:0",
            "AUTH_JWT_HS256_SECRET": SECRET,
            "SHUTDOWN_DRAIN_TIMEOUT": "2s",
        })
        self.stderr = open(self.log_path, "wb")
        self.proc = subprocess.Popen([self.binary, "serve"], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.stderr)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            if asyncio.run(self._serving()):
                return self
            time.sleep(0.2)
        raise RuntimeError(f"server not SERVING within 30 s; see {self.log_path}")

    async def _serving(self) -> bool:
        client = H2Client(self.port)
        try:
            await client.connect(1.0)
            stream = await client.unary(HEALTH_CHECK, EMPTY_MESSAGE, timeout=1.0)
            return stream.grpc_status == 0 and bytes(stream.data[5:]) == b"\x08\x01"
        except (OSError, ConnectionError, asyncio.TimeoutError):
            return False
        finally:
            await client.close()

    def nofile(self) -> str:
        try:
            with open(f"/proc/{self.proc.pid}/limits") as f:
                for line in f:
                    if line.startswith("Max open files"):
                        return line.split()[3]
        except OSError:
            pass
        return "?"

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.stderr.close()


# ---------------------------------------------------------------- sampler


class Sampler(threading.Thread):
    """Samples the server every ~100 ms: VmRSS, VmHWM, open fds, CPU ticks,
    and the stderr log's line and byte count."""

    def __init__(self, pid: int, log_path: str, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.log_path, self.interval = pid, log_path, interval
        self.samples = []  # (monotonic, rss_kb, hwm_kb, fds, cpu_ticks, log_lines, log_bytes)
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.log_lines = 0
        self.log_bytes = 0
        self._log = open(log_path, "rb")
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self):
        with self.lock:
            return self._sample()

    def _sample(self):
        rss = hwm = None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm = int(line.split()[1])
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                cpu = int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            return None
        chunk = self._log.read()
        if chunk:
            self.log_lines += chunk.count(b"\n")
            self.log_bytes += len(chunk)
        row = (time.monotonic(), rss, hwm, fds, cpu, self.log_lines, self.log_bytes)
        self.samples.append(row)
        return row

    def run(self):
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self):
        self.stop_event.set()
        self.join(5)
        self._log.close()

    def window(self, t0: float, t1: float):
        with self.lock:
            rows = [r for r in self.samples if t0 <= r[0] <= t1]
        return rows

    def peak_log_rate(self, t0: float, t1: float) -> int:
        rows = self.window(t0, t1)
        best, j = 0, 0
        for i in range(len(rows)):
            while rows[i][0] - rows[j][0] > 1.0:
                j += 1
            best = max(best, rows[i][5] - rows[j][5])
        return best


# ---------------------------------------------------------------- attacks


class Context:
    def __init__(self, server: Server, tokens: dict, scale: float):
        self.port = server.port
        self.metrics_port = server.metrics_port
        self.authority = f"127.0.0.1:{server.port}"
        self.tokens = tokens
        self.scale = scale
        self.log_path = server.log_path
        self.key = ""  # the table's "key counts" cell
        self.notes = []  # short lines printed under the table
        self.data = {}  # everything, for the JSON file

    def n(self, count: int) -> int:
        return max(1, int(count * self.scale))


def dist(values) -> str:
    if not values:
        return "-"
    return f"{min(values):.1f}/{pct(values, 0.5):.1f}/{max(values):.1f}s"


async def _hold_streams(ctx: Context, path: str, total: int, body, hold: float,
                        per_conn_cap: int, probe_over: int, max_conns: int):
    headers = grpc_headers(ctx.authority, path)
    clients, conn_fail = [], collections.Counter()
    opened = attempts = 0
    limits = collections.Counter()
    deadline = time.monotonic() + 90
    t_start = time.monotonic()
    while opened < total and attempts < max_conns and time.monotonic() < deadline:
        attempts += 1
        client = H2Client(ctx.port, keep_data=64)
        try:
            await client.connect(5.0)
        except (OSError, ConnectionError, asyncio.TimeoutError) as error:
            conn_fail[type(error).__name__] += 1
            client.abort()
            continue
        clients.append(client)
        limited = client.max_streams < UNLIMITED
        limits["unlimited" if not limited else client.max_streams] += 1
        want = min(total - opened, client.max_streams if limited else per_conn_cap)
        extra = probe_over if limited else 0
        if extra:
            client.ignore_stream_limit()
        for i in range(want + extra):
            if client.closed.is_set() or client.goaway is not None:
                break
            client.open_stream(headers, body=body, end=body is not None)
            if i < want:
                opened += 1
            if i % 250 == 249:
                await client.drain()
        await client.drain()
    t_opened = time.monotonic()
    # Hold: wake up once a second, bounded.
    hold_end = t_opened + hold
    while time.monotonic() < hold_end:
        await asyncio.sleep(min(1.0, max(0.0, hold_end - time.monotonic())))
    outcome, when = collections.Counter(), collections.defaultdict(list)
    statuses = collections.Counter()
    messages = collections.Counter()
    streaming = 0
    for client in clients:
        for stream in client.streams.values():
            if stream.reset == h2lib.ErrorCodes.REFUSED_STREAM:
                key = "refused"
            elif stream.reset is not None:
                key = "rst:" + h2lib._code_name(stream.reset)
            elif stream.grpc_status is not None or stream.outcome == "ended":
                key = "answered"
                statuses[stream.label()] += 1
            elif stream.outcome in ("goaway", "closed"):
                key = stream.outcome
            elif stream.ndata > 0:
                key = "open+msg"
                streaming += 1
            else:
                key = "pending"
            outcome[key] += 1
            if stream.t_end is not None and key not in ("pending", "open+msg"):
                when[key].append(stream.t_end - stream.t0)
            if stream.grpc_message and len(messages) < 3:
                messages[f"{stream.grpc_status}:{stream.grpc_message[:80]}"] += 1
    goaways = collections.Counter(c.goaway[0] for c in clients if c.goaway)
    closed_by_server = sum(1 for c in clients if c.closed.is_set())
    for client in clients:
        await client.close()
    ctx.data.update({
        "streams_opened_within_limit": opened, "connections": len(clients),
        "connect_failures": dict(conn_fail), "advertised_max_concurrent_streams": dict(limits),
        "outcome": dict(outcome), "statuses": dict(statuses), "messages": dict(messages),
        "time_to_outcome": {k: dist(v) for k, v in when.items()},
        "goaways": dict(goaways), "conns_closed_by_server": closed_by_server,
        "open_seconds": round(t_opened - t_start, 1),
    })
    lim = ",".join(str(k) for k in limits) or "-"
    ctx.key = (f"{sum(outcome.values())} streams/{len(clients)} conns (max_streams {lim}); "
               + fmt_counter(outcome))
    if conn_fail:
        ctx.key += f"; conn fail {fmt_counter(conn_fail)}"
    if goaways:
        ctx.key += f"; goaway {fmt_counter(goaways)}"
    extra_notes = [f"{k} after {dist(v)} (min/p50/max)" for k, v in when.items()]
    if statuses:
        extra_notes.append("answered grpc-status " + fmt_counter(statuses))
    if messages:
        extra_notes.append("messages: " + "; ".join(messages))
    ctx.notes.append(f"opened in {t_opened - t_start:.1f}s, held {hold:.0f}s; "
                     + ("; ".join(extra_notes) or "no stream was answered, reset or cut"))


async def attack_held_streams(ctx: Context):
    """HEADERS of Health/Check, never a body: 15,000 streams held ~20 s."""
    await _hold_streams(ctx, HEALTH_CHECK, ctx.n(15000), None, hold=20.0,
                        per_conn_cap=ctx.n(15000), probe_over=10, max_conns=3000)


async def attack_held_watch(ctx: Context):
    """20,000 complete Health/Watch requests held open ~20 s."""
    await _hold_streams(ctx, HEALTH_WATCH, ctx.n(20000), EMPTY_MESSAGE, hold=20.0,
                        per_conn_cap=ctx.n(20000), probe_over=10, max_conns=3000)


def get_metrics(port: int):
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            body = response.read()
        return len(body), body.count(b"\n"), (time.monotonic() - t0) * 1000.0, body
    except OSError as error:
        return None, None, None, str(error).encode()


async def attack_made_up_methods(ctx: Context):
    """5,000 unary calls to distinct made-up methods, no credentials."""
    size0, lines0, _, _ = await asyncio.to_thread(get_metrics, ctx.metrics_port)
    total = ctx.n(5000)
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits
    paths = [f"{SVC}Nope{i}_" + "".join(rng.choices(alphabet, k=200)) for i in range(total)]
    statuses, messages = collections.Counter(), {}
    details = collections.Counter()
    latencies = []
    next_index = iter(range(total))
    deadline = time.monotonic() + 120

    async def worker(client: H2Client):
        for i in next_index:
            if time.monotonic() > deadline or client.closed.is_set():
                statuses["not-sent"] += 1
                continue
            t0 = time.monotonic()
            stream = await client.unary(paths[i], EMPTY_MESSAGE, None, timeout=10.0)
            latencies.append((time.monotonic() - t0) * 1000.0)
            label = stream_label(stream)
            statuses[label] += 1
            details["details-bin" if stream.has_details else "no-details"] += 1
            if label not in messages:
                messages[label] = (stream.grpc_message or "")[:120]

    clients = []
    for _ in range(4):
        clients.append(await H2Client(ctx.port).connect(5.0))
    await asyncio.gather(*(worker(c) for c in clients for _ in range(50)))
    for client in clients:
        await client.close()
    size1, lines1, fetch_ms, body = await asyncio.to_thread(get_metrics, ctx.metrics_port)
    nope_lines = body.count(b"Nope") if size1 else 0
    ctx.data.update({"statuses": dict(statuses), "messages": messages, "details": dict(details),
                     "metrics_before": [size0, lines0], "metrics_after": [size1, lines1],
                     "metrics_fetch_ms": fetch_ms, "metrics_lines_naming_made_up_methods": nope_lines,
                     "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99)})
    kib = lambda b: "?" if b is None else f"{b:,} B"
    ctx.key = (f"{total} calls: status {fmt_counter(statuses)}; /metrics {kib(size0)}/{lines0} lines"
               f" -> {kib(size1)}/{lines1} lines ({nope_lines} mention made-up names, fetch {fmt_ms(fetch_ms)}ms)")
    ctx.notes.append("first messages: " + "; ".join(f"{k}: {v!r}" for k, v in list(messages.items())[:3])
                     + f"; {fmt_counter(details)}; call p50/p99 {fmt_ms(pct(latencies, .5))}/{fmt_ms(pct(latencies, .99))}ms")


async def attack_idle_connections(ctx: Context):
    """10,000 silent TCP connections + 500 with half the preface, held 45 s."""
    n_idle, n_half, hold = ctx.n(10000), ctx.n(500), 45.0
    half_preface = h2lib.PREFACE[:len(h2lib.PREFACE) // 2]
    connect_gate = asyncio.Semaphore(256)
    all_connected = asyncio.Event()
    results = []  # (kind, connected_at or None, closed_after or None, how)
    pending = [n_idle + n_half]
    conn_errors = collections.Counter()
    t_start = time.monotonic()

    async def one(kind: str):
        writer = None
        try:
            async with connect_gate:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(h2lib.HOST, ctx.port), 10.0)
                except (OSError, asyncio.TimeoutError) as error:
                    conn_errors[type(error).__name__] += 1
                    results.append((kind, None, None, "connect-failed"))
                    return
            t_conn = time.monotonic()
            if kind == "half":
                writer.write(half_preface)
            pending[0] -= 1
            if pending[0] == 0:
                everyone_up()
            # Read from the start (a close during the ramp-up counts from the
            # connect), until the hold ends, which is known once all are up.
            try:
                for _ in range(int(hold) + 200):  # bounded: ~1 s per turn before the hold is known
                    if hold_start[0] is None:
                        remaining = 1.0
                    else:
                        remaining = hold_start[0] + hold - time.monotonic()
                        if remaining <= 0:
                            raise asyncio.TimeoutError
                    try:
                        data = await asyncio.wait_for(reader.read(4096), remaining)
                    except asyncio.TimeoutError:
                        continue
                    if not data:
                        results.append((kind, t_conn, time.monotonic() - t_conn, "closed"))
                        break
                else:
                    raise asyncio.TimeoutError
            except asyncio.TimeoutError:
                results.append((kind, t_conn, None, "held"))
            except (ConnectionError, OSError):
                results.append((kind, t_conn, time.monotonic() - t_conn, "reset"))
        finally:
            if pending[0] > 0 and writer is None:
                pending[0] -= 1
                if pending[0] == 0:
                    everyone_up()
            if writer is not None:
                writer.close()

    # The hold clock starts when every connection is up (or failed).
    hold_start = [None]

    def everyone_up():
        if hold_start[0] is None:
            hold_start[0] = time.monotonic()
        all_connected.set()

    tasks = [asyncio.create_task(one("idle")) for _ in range(n_idle)]
    tasks += [asyncio.create_task(one("half")) for _ in range(n_half)]
    try:
        await asyncio.wait_for(all_connected.wait(), 120)
    except asyncio.TimeoutError:
        everyone_up()
    t_connected = time.monotonic() - t_start
    await asyncio.wait(tasks, timeout=hold + 15)
    for task in tasks:
        task.cancel()
    closed = collections.Counter()
    close_times = collections.defaultdict(list)
    unaccounted = n_idle + n_half - len(results)
    if unaccounted:
        closed["unaccounted"] = unaccounted
    for kind, _, after, how in results:
        closed[f"{kind}:{how}"] += 1
        if after is not None:
            close_times[kind].append(after)
    ctx.data.update({"outcome": dict(closed), "connect_errors": dict(conn_errors),
                     "connect_seconds": round(t_connected, 1),
                     "close_after": {k: dist(v) for k, v in close_times.items()}})
    ctx.key = f"{n_idle}+{n_half} conns (up in {t_connected:.1f}s): {fmt_counter(closed)}"
    if conn_errors:
        ctx.key += f"; connect errors {fmt_counter(conn_errors)}"
    ctx.notes.append("server closed after (min/p50/max since connect): "
                     + ("; ".join(f"{k} {dist(v)}" for k, v in close_times.items()) or "never"))


def rpc_counts(port: int, method: str) -> collections.Counter:
    """channel_assignment_rpc_requests_total{method=..., code=...} by code."""
    _, _, _, body = get_metrics(port)
    counts = collections.Counter()
    pattern = re.compile(r'^channel_assignment_rpc_requests_total\{(.*)\} (\S+)')
    for line in body.decode(errors="replace").splitlines():
        match = pattern.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if labels.get("method") == method:
                counts[labels.get("code", "?")] += int(float(match.group(2)))
    return counts


async def _flood_h2load(ctx: Context, seconds: float, body: bytes):
    """The flood by h2load (C): fast enough to keep 800 streams in flight."""
    body_path = os.path.join(OUT, "org-flood-body.bin")
    with open(body_path, "wb") as f:
        f.write(body)
    before = await asyncio.to_thread(rpc_counts, ctx.metrics_port, "AssignMailbox")
    proc = await asyncio.create_subprocess_exec(
        "h2load", "-c", "8", "-m", "100", "-t", "1", "-D", str(int(seconds)), "-d", body_path,
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-H", "authorization: Bearer " + ctx.tokens[ORG_A],
        f"http://{ctx.authority}{SVC}AssignMailbox",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    except asyncio.TimeoutError:
        proc.kill()
        out = b"h2load timed out"
    after = await asyncio.to_thread(rpc_counts, ctx.metrics_port, "AssignMailbox")
    counts = after - before
    text = out.decode(errors="replace")
    summary = [line.strip() for line in text.splitlines()
               if line.startswith(("requests:", "finished in", "status codes:", "time for request:"))]
    ctx.data.update({"a_tool": "h2load -c 8 -m 100", "a_h2load": summary, "a_counts": dict(counts)})
    return counts, summary


async def _flood_python(ctx: Context, seconds: float):
    """Fallback flood without h2load (slower: the attacker is the limit)."""
    deadline = time.monotonic() + seconds
    counts = collections.Counter()

    async def group(index: int):
        for _attempt in range(20):
            if time.monotonic() > deadline:
                break
            try:
                client = await H2Client(ctx.port).connect(5.0)
            except (OSError, ConnectionError, asyncio.TimeoutError) as error:
                counts["connect-" + type(error).__name__] += 1
                await asyncio.sleep(0.5)
                continue

            async def worker(w: int):
                k = index * 100 + w
                while time.monotonic() < deadline and not client.closed.is_set() and client.goaway is None:
                    i = k % 50
                    stream = await client.unary(SVC + "AssignMailbox", assign_mailbox(f"flood-{i}", mailbox_a(i)),
                                                ctx.tokens[ORG_A], timeout=10.0)
                    counts[stream_label(stream)] += 1
                    k += 800

            await asyncio.gather(*(worker(w) for w in range(100)))
            await client.close()
    await asyncio.gather(*(group(i) for i in range(8)))
    ctx.data.update({"a_tool": "python h2, 8 conns x 100 streams", "a_counts": dict(counts)})
    return counts, []


async def attack_org_flood(ctx: Context):
    """Org A: 8 conns x 100 in-flight AssignMailbox for 15 s; org B: one
    UnassignMailbox every 20 ms from another process (the victim, started
    by the runner 'quiet' seconds before the flood)."""
    quiet, flood = 2.0, 15.0
    await asyncio.sleep(quiet)
    t_flood0 = time.time()
    # An idempotent assign of an already linked mailbox: reads only, no row lock.
    body = assign_mailbox("flood-0", mailbox_a(0))
    if shutil.which("h2load") and os.environ.get("FLOOD_TOOL", "h2load") == "h2load":
        counts, summary = await _flood_h2load(ctx, flood, body)
    else:
        counts, summary = await _flood_python(ctx, flood)
    t_flood1 = time.time()
    await asyncio.sleep(1.0)
    ctx.data["flood_window"] = (t_flood0, t_flood1)
    a_total = sum(counts.values())
    ctx.key = f"A {a_total} calls ({a_total / flood:.0f}/s): {fmt_counter(counts)}"
    ctx.notes.append(f"A by {ctx.data['a_tool']}: " + " | ".join(summary))


def org_flood_victim_summary(ctx: Context, results):
    t0, t1 = ctx.data["flood_window"]
    quiet = [r for r in results if r[0] < t0]
    during = [r for r in results if t0 <= r[0] < t1]
    counts = collections.Counter(r[1] for r in during)
    lat_all = [r[2] for r in during]
    lat_ok = [r[2] for r in during if r[1] == "0"]
    lat_quiet = [r[2] for r in quiet if r[1] == "0"]
    ctx.data.update({"b_counts": dict(counts), "b_p50_ms": pct(lat_all, .5), "b_p99_ms": pct(lat_all, .99),
                     "b_ok_p50_ms": pct(lat_ok, .5), "b_ok_p99_ms": pct(lat_ok, .99),
                     "b_quiet_p50_ms": pct(lat_quiet, .5), "b_quiet_p99_ms": pct(lat_quiet, .99),
                     "b_quiet_counts": dict(collections.Counter(r[1] for r in quiet))})
    ctx.key = (f"B {len(during)} calls: {fmt_counter(counts)} (8=RESOURCE_EXHAUSTED), "
               f"p50/p99 {fmt_ms(pct(lat_all, .5))}/{fmt_ms(pct(lat_all, .99))}ms; " + ctx.key)
    ctx.notes.append(f"B before the flood: {fmt_counter(collections.Counter(r[1] for r in quiet))}, "
                     f"p50/p99 {fmt_ms(pct(lat_quiet, .5))}/{fmt_ms(pct(lat_quiet, .99))}ms; "
                     f"B OK-only during flood p50/p99 {fmt_ms(pct(lat_ok, .5))}/{fmt_ms(pct(lat_ok, .99))}ms")


async def attack_rapid_reset(ctx: Context):
    """200 connection slots x 1,000 streams: HEADERS + DATA(END_STREAM) of a
    valid AssignMailbox, then RST_STREAM(CANCEL) at once. A slot whose
    connection the server closes reconnects and goes on (bounded)."""
    n_slots, n_streams = ctx.n(200), ctx.n(1000)
    max_conns_per_slot = 200
    block = h2lib.stateless_header_block(
        grpc_headers(ctx.authority, SVC + "AssignMailbox", ctx.tokens[ORG_A]))
    body = assign_mailbox("flood-0", mailbox_a(0))
    cancel = (8).to_bytes(4, "big")
    sent = [0]
    conns = [0]
    ended = collections.Counter()  # how each connection ended
    resets = collections.Counter()
    headers = [0]
    per_conn = []
    complete = [0]
    deadline = time.monotonic() + 60

    async def slot(index: int):
        done = 0
        for _ in range(max_conns_per_slot):
            if done >= n_streams or time.monotonic() > deadline:
                break
            conn = RawConn(ctx.port)
            try:
                await conn.connect(5.0)
            except (OSError, ConnectionError, asyncio.TimeoutError) as error:
                ended["connect-" + type(error).__name__] += 1
                conn.close()
                await asyncio.sleep(0.1)
                continue
            conns[0] += 1
            sid, batch, on_conn = 1, [], 0
            while done < n_streams and time.monotonic() < deadline:
                if conn.closed.is_set() or conn.goaway is not None:
                    break
                batch.append(raw_frame(h2lib.HEADERS, h2lib.END_HEADERS, sid, block)
                             + raw_frame(h2lib.DATA, h2lib.END_STREAM, sid, body)
                             + raw_frame(h2lib.RST_STREAM, 0, sid, cancel))
                sid += 2
                done += 1
                on_conn += 1
                if len(batch) == 10:
                    conn.writer.write(b"".join(batch))
                    batch.clear()
                    try:
                        await conn.writer.drain()
                    except (ConnectionError, OSError):
                        break
                    await asyncio.sleep(0)  # let the reader see a GOAWAY or close
            if batch and not conn.writer.is_closing():
                conn.writer.write(b"".join(batch))
            if not conn.closed.is_set():
                try:
                    await asyncio.wait_for(conn.closed.wait(), 0.3)
                except asyncio.TimeoutError:
                    pass
            ended["goaway:" + conn.goaway[0] if conn.goaway else
                  ("closed" if conn.closed.is_set() else "open-at-end")] += 1
            resets.update(conn.resets)
            headers[0] += conn.headers
            per_conn.append(on_conn)
            conn.close()
        sent[0] += done
        if done >= n_streams:
            complete[0] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(slot(i) for i in range(n_slots)))
    elapsed = time.monotonic() - t0
    ctx.data.update({"streams_sent": sent[0], "seconds": round(elapsed, 1), "connections": conns[0],
                     "connection_ends": dict(ended), "server_resets": dict(resets),
                     "server_response_headers": headers[0], "slots_complete": complete[0],
                     "streams_per_connection_p50": pct(per_conn, .5)})
    ctx.key = (f"{sent[0]} streams written+reset in {elapsed:.1f}s ({sent[0] / max(elapsed, 1e-3):.0f}/s) "
               f"over {conns[0]} conns ({n_slots} slots, {complete[0]} finished {n_streams}); "
               f"conn ends {fmt_counter(ended)}; server RST {fmt_counter(resets)}; response HEADERS {headers[0]}")
    ctx.notes.append(f"streams written per connection before it ended: p50 {pct(per_conn, .5)}, "
                     f"max {max(per_conn) if per_conn else '-'} (the server may not have read them all)")


async def attack_malformed_protobuf(ctx: Context):
    """AssignMailbox with a valid token and garbage / oversized / truncated bodies."""
    client = await H2Client(ctx.port).connect(5.0)
    token = ctx.tokens[ORG_A]
    cases = [
        ("valid", assign_mailbox("flood-0", mailbox_a(0))),
        ("garbage ff ff ff", h2lib.grpc_frame(b"\xff\xff\xff")),
        ("oversized 100KiB", assign_mailbox("x" * (100 * 1024), mailbox_a(0))),
        ("length prefix > body", b"\x00\x00\x00\x00\x10" + b"\x0a\x02ab"),
        ("compressed flag, no encoding", b"\x01" + assign_mailbox("flood-0", mailbox_a(0))[1:]),
    ]
    rows = []
    for name, body in cases:
        stream = await client.unary(SVC + "AssignMailbox", body, token, timeout=10.0)
        rows.append({"case": name, "status": stream_label(stream), "message": stream.grpc_message,
                     "details_bin": stream.has_details,
                     "details_bin_len": len(stream.meta("grpc-status-details-bin") or "")})
        if client.closed.is_set():
            client = await H2Client(ctx.port).connect(5.0)
    await client.close()
    ctx.data["cases"] = rows
    ctx.key = "; ".join(f"{r['case']}: {r['status']}{' +details' if r['details_bin'] else ' no-details'}"
                        for r in rows)
    for r in rows[1:]:
        ctx.notes.append(f"{r['case']}: grpc-status {r['status']}, message {(r['message'] or '')[:110]!r}, "
                         f"grpc-status-details-bin {'present (' + str(r['details_bin_len']) + ' b64 chars)' if r['details_bin'] else 'absent'}")


ATTACKS = {
    "held-streams": attack_held_streams,
    "held-watch": attack_held_watch,
    "made-up-methods": attack_made_up_methods,
    "idle-connections": attack_idle_connections,
    "org-flood": attack_org_flood,
    "rapid-reset": attack_rapid_reset,
    "malformed-protobuf": attack_malformed_protobuf,
}


# ---------------------------------------------------------------- runner


def start_probe(spec: dict):
    mp = multiprocessing.get_context("spawn")
    parent, child = mp.Pipe()
    proc = mp.Process(target=h2lib.probe_process, args=(spec, child), daemon=True)
    proc.start()
    return proc, parent


def finish_probe(proc, pipe, wait: float):
    results = []
    if pipe.poll(wait):
        try:
            results = pipe.recv()
        except EOFError:
            pass
    proc.join(2)
    if proc.is_alive():
        proc.kill()
    return results


def distinct_lines(path: str, start: int, end: int, limit: int = 3):
    """The first `limit` distinct kinds of line (numbers and made-up names
    masked), each with how often that kind occurs in the window."""
    with open(path, "rb") as f:
        f.seek(start)
        chunk = f.read(max(0, end - start))
    order, counts, example = [], collections.Counter(), {}
    for raw in chunk.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", raw.decode(errors="replace"))
        shape = re.sub(r"Nope\d+_\w+", "Nope#_...", line.split(" ", 1)[-1])
        shape = re.sub(r"[0-9]+", "#", shape)
        if shape not in counts:
            order.append(shape)
            example[shape] = line
        counts[shape] += 1
    return [f"{counts[shape]}x {example[shape][:200]}" for shape in order[:limit]] + \
        ([f"(+{len(order) - limit} more kinds)"] if len(order) > limit else [])


def run_attack(name: str, binary: str, tokens: dict, scale: float):
    log(f"{name}: starting a fresh server")
    server = Server(binary, name).start()
    sampler = Sampler(server.proc.pid, server.log_path)
    sampler.start()
    time.sleep(1.0)
    before = sampler.sample()
    ctx = Context(server, tokens, scale)
    probe_duration = 200.0
    if name == "org-flood":
        victim_spec = {"kind": "unary", "port": server.port, "interval": 0.02, "duration": 2.0 + 15.0 + 1.0,
                       "timeout": 5.0, "method": "UnassignMailbox", "body": unassign_mailbox("b-agent-0"),
                       "token": tokens[ORG_B]}
        victim = start_probe(victim_spec)
    probe = start_probe({"kind": "health", "port": server.port, "interval": 1.0,
                         "duration": probe_duration, "timeout": 5.0})
    time.sleep(1.5)  # let the probe processes import and connect
    if name == "org-flood":
        victim[1].send("go")
    probe[1].send("go")
    start = sampler.sample() or before
    t0 = time.monotonic()
    log_pos0 = start[6]
    error = None
    try:
        asyncio.run(asyncio.wait_for(ATTACKS[name](ctx), 300))
    except Exception as exc:  # a crashed attack still gets its row
        error = f"{type(exc).__name__}: {exc}"[:200]
    t1 = time.monotonic()
    # Log lines are written by the server's own thread: give it a moment.
    time.sleep(1.0)
    end = sampler.sample() or start
    log_pos1 = end[6]
    probe[1].send("stop")
    probe_results = finish_probe(*probe, wait=10)
    if name == "org-flood":
        victim_results = finish_probe(*victim, wait=15)
        if "flood_window" in ctx.data:
            org_flood_victim_summary(ctx, victim_results)
    during = sampler.window(start[0], end[0])
    lines_during = end[5] - start[5]
    bytes_during = end[6] - start[6]
    peak_rate = sampler.peak_log_rate(start[0], end[0])
    time.sleep(max(0.0, AFTER_WAIT - (time.monotonic() - t1)))
    after = sampler.sample() or during[-1]
    alive = server.proc.poll() is None
    nofile = server.nofile()
    server.stop()
    sampler.stop()
    probe_labels = collections.Counter(r[1] for r in probe_results)
    probe_ok = [r[2] for r in probe_results if r[1] == "0"]
    row = {
        "attack": name,
        "seconds": round(t1 - t0, 1),
        "rss_mib": [before[1] / 1024, max(r[1] for r in during) / 1024, after[1] / 1024],
        "vmhwm_mib": after[2] / 1024,
        "fds": [before[3], max(r[3] for r in during), after[3]],
        "cpu_s": (end[4] - start[4]) / sampler.tick,
        "log_lines": lines_during,
        "log_bytes": bytes_during,
        "log_lines_per_s": lines_during / max(end[0] - start[0], 1e-3),
        "log_peak_lines_1s": peak_rate,
        "log_first_distinct": distinct_lines(server.log_path, log_pos0, log_pos1),
        "probe": {"total": len(probe_results), "labels": dict(probe_labels),
                  "ok_p50_ms": pct(probe_ok, .5), "ok_max_ms": max(probe_ok) if probe_ok else None},
        "server_alive_after": alive,
        "server_nofile": nofile,
        "key": ctx.key,
        "notes": ctx.notes,
        "error": error,
        "data": ctx.data,
        "log": server.log_path,
    }
    log(f"{name}: done in {t1 - t0:.0f}s")
    return row


def print_table(rows, header_lines):
    out = sys.stdout
    for line in header_lines:
        print(line, file=out)
    cols = ["attack", "RSS MiB b/peak/a (HWM)", "fds b/peak/a", "cpu s", "log lines (KiB, /s, peak/s)",
            "probe ok/n p50/max ms", "key counts"]
    table = []
    for r in rows:
        b, p, a = r["rss_mib"]
        probe = r["probe"]
        table.append([
            r["attack"],
            f"{b:.0f}/{p:.0f}/{a:.0f} ({r['vmhwm_mib']:.0f})",
            "{}/{}/{}".format(*r["fds"]),
            f"{r['cpu_s']:.1f}",
            f"{r['log_lines']} ({r['log_bytes'] / 1024:.0f}, {r['log_lines_per_s']:.0f}, {r['log_peak_lines_1s']})",
            f"{probe['labels'].get('0', 0)}/{probe['total']} {fmt_ms(probe['ok_p50_ms'])}/{fmt_ms(probe['ok_max_ms'])}",
            (r["key"] or "-") + ("" if r["server_alive_after"] else " [SERVER DIED]")
            + (f" [ERROR {r['error']}]" if r["error"] else ""),
        ])
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    widths[-1] = len(cols[-1])
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)), file=out)
    print("-|-".join("-" * w for w in widths), file=out)
    for t in table:
        print(" | ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip(), file=out)
    print("notes:", file=out)
    for r in rows:
        for note in r["notes"]:
            print(f"  {r['attack']}: {note}", file=out)
        bad_probe = {k: v for k, v in r["probe"]["labels"].items() if k != "0"}
        if bad_probe:
            print(f"  {r['attack']}: probe failures {bad_probe}", file=out)
        if r["log_lines"]:
            for line in r["log_first_distinct"]:
                print(f"  {r['attack']}: log> {line[:200]}", file=out)


def main():
    parser = argparse.ArgumentParser(prog="drills/hostile/run", description=__doc__)
    parser.add_argument("attacks", nargs="*", help=f"any of {', '.join(ATTACKS)} (default: all)")
    parser.add_argument("--bin", default=os.environ.get("BIN") or os.path.join(ROOT, "target/release/channel-assignment"))
    parser.add_argument("--scale", type=float, default=float(os.environ.get("SCALE", "1")),
                        help="multiply every count by this (e.g. 0.05 for a smoke run)")
    args = parser.parse_args()
    names = args.attacks or list(ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack(s) {unknown}; choose from {list(ATTACKS)}")
    binary = os.path.abspath(args.bin)
    os.makedirs(OUT, exist_ok=True)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True).stdout.decode().strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--short", "src"], capture_output=True).stdout.decode().strip()
    log(f"database {DB_NAME}: recreate, migrate, seed")
    prepare_database(binary)
    tokens = {org: mint_token(binary, org) for org in (ORG_A, ORG_B)}
    started = time.monotonic()
    rows = []
    for name in names:
        rows.append(run_attack(name, binary, tokens, args.scale))
    total = time.monotonic() - started
    stat = os.stat(binary)
    header = [
        f"hostile drill: bin {binary} ({time.strftime('%Y-%m-%d %H:%M', time.localtime(stat.st_mtime))}, "
        f"{stat.st_size / 1e6:.1f} MB); work tree now at {commit}{' with uncommitted src/ changes' if dirty else ', src/ clean'} "
        f"(the binary may be older); scale {args.scale}; server nofile {rows[0]['server_nofile'] if rows else '?'}; "
        f"total {total:.0f}s; fresh server per attack; 'after' = {AFTER_WAIT:.0f}s after the attack",
    ]
    print_table(rows, header)
    result = {"header": header, "commit": commit, "src_dirty": dirty, "binary": binary,
              "scale": args.scale, "rows": rows}
    path = os.path.join(OUT, f"results-{time.strftime('%Y%m%dT%H%M%S')}-{os.path.basename(binary)}.json")
    for target in (path, os.path.join(OUT, "last-run.json")):
        with open(target, "w") as f:
            json.dump(result, f, indent=1, default=str)
    print(f"full results: {os.path.relpath(path, ROOT)}; server logs: target/hostile/<attack>.stderr.log")


if __name__ == "__main__":
    main()
