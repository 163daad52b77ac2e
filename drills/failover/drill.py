"""The failover drill's load, faults and checks (started by drills/failover/run).

Everything it needs comes from DRILL_* environment variables set by `run`,
which has already started PostgreSQL a (primary) and b (synchronous standby),
HAProxy (endpoint: a) and the service. This script seeds the data through
the proxy, then runs three phases under load and checks each:

  restart    pg_ctl restart -m fast of the primary (a)
  failover   kill -9 of a (postmaster and every child), promotion of b,
             endpoint moved to b
  read-only  a started again with default_transaction_read_only=on, the
             endpoint moved to it for a moment, the service's sessions on b
             ended meanwhile (so that its pool must reconnect, and meets the
             read-only server), then the endpoint moved back to b without
             cutting anything

Each worker owns its identities and their channels (no two workers touch
the same row), issues one request at a time with a 2 s deadline and records
every answer. Each phase has fresh identities, in two groups per worker:
the "before" group takes every request sent before the fault, the "after"
group every request sent from the fault on. So the writes acknowledged just
before the fault are not overwritten by later ones, and their loss cannot
hide behind them. The "after" identities are linked (SQL, through the
proxy) just before their phase, so a stale server that answers from old
rows is caught too. After each phase, for every identity and channel kind,
the primary must hold what the last acknowledged (OK) request asked for,
unless a later request ended with an unknown outcome (UNAVAILABLE,
DEADLINE_EXCEEDED, CANCELLED, INTERNAL, UNKNOWN) and asked for what is
there: that is counted as "unacknowledged but present". The identities of
earlier phases must still hold what their phase's check found.
"""

import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

sys.path.insert(0, os.environ["DRILL_STUBS"])

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from channels.v1 import channel_assignment_pb2 as pb  # noqa: E402
from channels.v1 import channel_assignment_pb2_grpc as pb_grpc  # noqa: E402

WORK = os.environ["DRILL_WORK"]
PG_BIN = os.environ["DRILL_PG_BIN"]
RUN_AS = os.environ.get("DRILL_RUN_AS", "")
PORT = {"a": int(os.environ["DRILL_PORT_A"]), "b": int(os.environ["DRILL_PORT_B"])}
PORT_PROXY = int(os.environ["DRILL_PORT_PROXY"])
GRPC_ADDR = os.environ["DRILL_GRPC_ADDR"]
TOKEN = os.environ["DRILL_TOKEN"]
SERVICE_PID = int(os.environ["DRILL_SERVICE_PID"])
WORKERS = int(os.environ.get("DRILL_WORKERS", "8"))
SETUP_SECONDS = int(os.environ.get("DRILL_SETUP_SECONDS", "0"))
PG_ROOT = os.environ["DRILL_PG_ROOT"]
DATA = {node: os.path.join(PG_ROOT, node) for node in ("a", "b")}
PG_LOG = {node: os.path.join(PG_ROOT, "logs", f"{node}.log") for node in ("a", "b")}
HAPROXY_SOCKET = os.path.join(WORK, "haproxy.sock")

ORG = "org_drill"
IDENTITIES_PER_WORKER = 4
CHANNELS_PER_IDENTITY = 3
DEADLINE = 2.0  # seconds, per request
BACKOFF = 0.05  # after a failed answer, as a real client would
WARMUP = 2.0
RECOVERY_LIMIT = 30.0  # seconds after the promotion / restart / move back
READ_ONLY_MOMENT = 2.0
# An answer that tells nothing about whether the write happened.
UNKNOWN_OUTCOME = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL", "UNKNOWN"}
# The codes allowed while the database is away.
RETRYABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}

T0 = time.monotonic()


def now():
    return time.monotonic() - T0


def say(line):
    print(f"[failover] {line}", flush=True)


class DrillError(Exception):
    """The drill itself could not do what it meant to (not the service's fault)."""


# --- Tools: PostgreSQL, HAProxy, the service process -----------------------


def as_pg(args, timeout=60):
    command = (["runuser", "-u", RUN_AS, "--"] if RUN_AS else []) + args
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd="/")
    if result.returncode != 0:
        raise DrillError(f"{' '.join(args[:2])} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def psql(port, sql, database="drill", timeout=20):
    result = subprocess.run(
        [os.path.join(PG_BIN, "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
         "-d", database, "-At", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"],
        input=sql, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise DrillError(f"psql on port {port} failed: {result.stderr.strip()}")
    return result.stdout


def pg_ctl(*args, timeout=60):
    return as_pg([os.path.join(PG_BIN, "pg_ctl"), *args], timeout=timeout)


def haproxy(command):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(HAPROXY_SOCKET)
        sock.sendall(command.encode() + b"\n")
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    text = out.decode().strip()
    if text and command.startswith("set "):
        raise DrillError(f"haproxy refused '{command}': {text}")
    return text


def endpoint(ready, maint):
    """Moves the endpoint as an operator moves the -rw Service: the new
    server takes new connections, established ones stay where they are."""
    haproxy(f"set server pg/{ready} state ready")
    haproxy(f"set server pg/{maint} state maint")


def proxy_server_states():
    """{server: (operational state, admin state)} from HAProxy."""
    states = {}
    for line in haproxy("show servers state pg").splitlines():
        fields = line.split()
        if len(fields) > 6 and fields[1] == "pg":
            states[fields[3]] = (int(fields[5]), int(fields[6]))
    return states


def wait_proxy_check(server, limit=10.0):
    """Waits until HAProxy's primary check passes for `server`."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proxy_server_states().get(server, (0, 0))[0] == 2:
            return
        time.sleep(0.05)
    raise DrillError(f"HAProxy's primary check never passed for {server}")


def kill9_instance(node):
    """kill -9 of the postmaster and all its children at once: the node is lost."""
    with open(os.path.join(DATA[node], "postmaster.pid")) as f:
        postmaster = int(f.readline())
    pids = [postmaster]
    try:
        with open(f"/proc/{postmaster}/task/{postmaster}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def alive(pid):
    """Whether a process exists and is not a zombie (in a container, nobody
    may reap the killed postmaster for a while)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_dead(pids, limit=10.0):
    deadline = time.monotonic() + limit
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise DrillError(f"processes {pids} survived kill -9")
        time.sleep(0.02)


def wait_sync_standby(primary, limit=15.0):
    deadline = time.monotonic() + limit
    state = ""
    while time.monotonic() < deadline:
        state = psql(PORT[primary], "SELECT sync_state FROM pg_stat_replication "
                                    "WHERE application_name = 'standby'", database="postgres").strip()
        if state == "sync":
            return
        time.sleep(0.1)
    raise DrillError(f"the standby is not synchronous (sync_state '{state}')")


def service_start_time():
    """The service process's start time (in clock ticks), None if it is gone."""
    try:
        with open(f"/proc/{SERVICE_PID}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def service_log_count(needle):
    try:
        with open(os.path.join(WORK, "service.log"), errors="replace") as f:
            return sum(needle in line for line in f)
    except OSError:
        return 0


# --- The load --------------------------------------------------------------


Record = collections.namedtuple("Record", "worker start end handle kind target code message")


class Worker(threading.Thread):
    """One client: its own channel, its own identities, one request at a time."""

    def __init__(self, index, groups, stop, faulted):
        super().__init__(daemon=True, name=f"worker-{index}")
        self.index = index
        # {"before": [(handle, [mailbox ids], [phone number ids])], "after": [...]}
        self.groups = groups
        self.stop = stop
        self.faulted = faulted
        self.records = []
        self.rng = random.Random(index)
        self.channel = grpc.insecure_channel(GRPC_ADDR)
        self.stub = pb_grpc.ChannelAssignmentStub(self.channel)
        self.metadata = (("authorization", f"Bearer {TOKEN}"),)
        self.wrong_answers = []

    def run(self):
        while not self.stop.is_set():
            group = self.groups["after" if self.faulted.is_set() else "before"]
            handle, mailboxes, phone_numbers = self.rng.choice(group)
            op = self.rng.randrange(10)
            if op < 4:
                kind, target = "mailbox", self.rng.choice(mailboxes)
                call = self.stub.AssignMailbox
                request = pb.AssignMailboxRequest(agent_handle=handle, mailbox_id=target)
            elif op < 5:
                kind, target = "mailbox", None
                call = self.stub.UnassignMailbox
                request = pb.UnassignMailboxRequest(agent_handle=handle)
            elif op < 9:
                kind, target = "phone_number", self.rng.choice(phone_numbers)
                call = self.stub.AssignPhoneNumber
                request = pb.AssignPhoneNumberRequest(agent_handle=handle, phone_number_id=target)
            else:
                kind, target = "phone_number", None
                call = self.stub.UnassignPhoneNumber
                request = pb.UnassignPhoneNumberRequest(agent_handle=handle)
            start = now()
            try:
                response = call(request, timeout=DEADLINE, metadata=self.metadata)
                code, message = "OK", ""
                if target is not None:
                    linked = getattr(response, kind).id if response.HasField(kind) else None
                    if linked != target:
                        self.wrong_answers.append(f"{handle} {kind}: asked {target}, answer says {linked}")
            except grpc.RpcError as error:
                code, message = error.code().name, error.details() or ""
            self.records.append(Record(self.index, start, now(), handle, kind, target, code, message))
            if code != "OK":
                time.sleep(BACKOFF)

    def trailing_oks(self):
        count = 0
        for record in reversed(self.records):
            if record.code != "OK":
                break
            count += 1
        return count


class HealthWatch(threading.Thread):
    """Polls readiness every 100 ms and records each change with its time."""

    def __init__(self):
        super().__init__(daemon=True, name="health")
        self.channel = grpc.insecure_channel(GRPC_ADDR)
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.flips = []  # (time, state)
        self.stopped = threading.Event()

    @property
    def state(self):
        return self.flips[-1][1] if self.flips else None

    def run(self):
        while not self.stopped.is_set():
            try:
                answer = self.stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1.0)
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.RpcError as error:
                state = f"error:{error.code().name}"
            if state != self.state:
                self.flips.append((now(), state))
            self.stopped.wait(0.1)


class Load:
    def __init__(self, plan):
        self.stop = threading.Event()
        self.faulted = threading.Event()  # set by the phase just before its fault
        self.workers = [Worker(i, groups, self.stop, self.faulted) for i, groups in enumerate(plan)]
        for worker in self.workers:
            worker.start()

    def records(self):
        return [r for w in self.workers for r in w.records]

    def finish(self):
        self.stop.set()
        for worker in self.workers:
            worker.join(DEADLINE + 3)
            worker.channel.close()

    def oks(self):
        return sum(r.code == "OK" for w in self.workers for r in w.records)

    def recovered(self):
        """Every worker's last 3 answers are OK."""
        return all(w.trailing_oks() >= 3 for w in self.workers)


# --- Seeding and checking ---------------------------------------------------


def seed(phase_names):
    """For each phase and worker, two groups of identities (before and after
    the fault), each identity with its own mailboxes and phone numbers.
    Returns {phase: [worker's {"before": [...], "after": [...]}]}."""
    plans, rows = {}, []
    number = 0
    for p, phase in enumerate(phase_names):
        plans[phase] = []
        for w in range(WORKERS):
            groups = {}
            for group in ("before", "after"):
                identities = []
                for i in range(IDENTITIES_PER_WORKER):
                    handle = f"p{p}-w{w}-{group}-{i}"
                    mailboxes = [str(uuid.uuid4()) for _ in range(CHANNELS_PER_IDENTITY)]
                    phones = [str(uuid.uuid4()) for _ in range(CHANNELS_PER_IDENTITY)]
                    identities.append((handle, mailboxes, phones))
                    rows.append(f"INSERT INTO identities (organization_id, agent_handle, display_name) "
                                f"VALUES ('{ORG}', '{handle}', 'drill {handle}');")
                    for m, mailbox in enumerate(mailboxes):
                        rows.append(f"INSERT INTO mailboxes (organization_id, id, email_address) "
                                    f"VALUES ('{ORG}', '{mailbox}', '{handle}-{m}@drill.example');")
                    for phone in phones:
                        number += 1
                        rows.append(f"INSERT INTO phone_numbers (organization_id, id, number) "
                                    f"VALUES ('{ORG}', '{phone}', '+1555{number:07d}');")
                groups[group] = identities
            plans[phase].append(groups)
    psql(PORT_PROXY, "BEGIN;\n" + "\n".join(rows) + "\nCOMMIT;\n")
    return plans


def prelink(plan):
    """Links each "after" identity to its first mailbox and phone number,
    through the proxy, just before the phase: on the primary of the moment.
    A server left behind (the old primary after the failover) does not have
    these links, so an answer it gives from its stale rows (an unassign
    that finds nothing to unlink, say) shows up as a lost write.
    Returns the baseline: {(handle, kind): value before the phase}."""
    baseline, statements = {}, []
    for groups in plan:
        for handle, _, _ in groups["before"]:
            baseline[(handle, "mailbox")] = baseline[(handle, "phone_number")] = None
        for handle, mailboxes, phones in groups["after"]:
            baseline[(handle, "mailbox")], baseline[(handle, "phone_number")] = mailboxes[0], phones[0]
            statements.append(f"UPDATE identities SET mailbox_id = '{mailboxes[0]}', "
                              f"phone_number_id = '{phones[0]}' WHERE organization_id = '{ORG}' "
                              f"AND agent_handle = '{handle}';")
    psql(PORT_PROXY, "BEGIN;\n" + "\n".join(statements) + "\nCOMMIT;\n")
    return baseline


def read_links(node):
    links = {}
    out = psql(PORT[node], "SELECT agent_handle, coalesce(mailbox_id::text, ''), "
                           f"coalesce(phone_number_id::text, '') FROM identities WHERE organization_id = '{ORG}'")
    for line in out.splitlines():
        handle, mailbox, phone = line.split("|")
        links[(handle, "mailbox")] = mailbox or None
        links[(handle, "phone_number")] = phone or None
    return links


def check_writes(records, expected, actual):
    """Compares what the primary holds with what was acknowledged.

    `expected` maps each (handle, kind) of the phase to its value before the
    phase (None: nothing linked); it is updated to what the primary holds."""
    by_key = collections.defaultdict(list)
    for record in sorted(records, key=lambda r: r.start):
        by_key[(record.handle, record.kind)].append(record)
    lost, unacked_present, details = 0, 0, []
    for key, baseline in list(expected.items()):
        acked, unknown_since = baseline, []
        for record in by_key.get(key, []):
            if record.code == "OK":
                acked, unknown_since = record.target, []
            elif record.code in UNKNOWN_OUTCOME:
                unknown_since.append(record.target)
        held = actual.get(key, "missing row")
        if held != acked:
            if held in unknown_since:
                unacked_present += 1
            else:
                lost += 1
                details.append(f"{key[0]} {key[1]}: acknowledged {acked}, primary holds {held}")
        expected[key] = held
    unknown = sum(r.code in UNKNOWN_OUTCOME for r in records)
    return lost, unacked_present, unknown, details


# --- Phases -----------------------------------------------------------------


class Phase:
    def __init__(self, name):
        self.name = name
        self.events = []  # (time, what)
        self.failures = []  # the reasons this phase fails
        self.notes = []
        self.fault = None
        self.action = None
        self.action_name = ""
        self.recovered_after = None
        self.window = None
        self.span = None
        self.first_failure = None
        self.last_failure = None
        self.codes = collections.Counter()
        self.flips = []
        self.lost = self.unacked_present = self.unknown = 0
        self.requests = 0
        self.recovered_ok = False

    def event(self, what):
        self.events.append((now(), what))


def wait_recovery(phase, load, health):
    """Until every worker has 3 OKs in a row and readiness is SERVING, at most
    RECOVERY_LIMIT after the phase's action (promotion, restart, move back)."""
    while now() - phase.action < RECOVERY_LIMIT:
        if load.recovered() and health.state == "SERVING":
            phase.recovered_ok = True
            return
        time.sleep(0.05)
    reasons = []
    if not load.recovered():
        stuck = sum(w.trailing_oks() < 3 for w in load.workers)
        reasons.append(f"{stuck} of {len(load.workers)} clients still failing")
    if health.state != "SERVING":
        reasons.append(f"readiness {health.state}")
    phase.failures.append(f"did not recover within {RECOVERY_LIMIT:.0f} s of the {phase.action_name} "
                          f"({', '.join(reasons)})")


def run_phase(phase, plan, health, settled, primary_after, fault):
    say(f"--- phase {phase.name}")
    expected = prelink(plan)
    start = now()
    load = Load(plan)
    time.sleep(WARMUP)
    if load.oks() == 0:
        load.finish()
        raise DrillError(f"phase {phase.name}: no request succeeded during the warm-up")
    try:
        fault(phase, load)
        if phase.action is not None and not phase.failures:
            wait_recovery(phase, load, health)
        if phase.recovered_ok:
            time.sleep(1.0)  # a little steady load after recovery
    finally:
        load.finish()
    end = now()
    records = load.records()
    summarize(phase, records, health, start, end)
    for worker in load.workers:
        for wrong in worker.wrong_answers:
            phase.failures.append(f"an OK answer that does not show the change: {wrong}")
    actual = read_links(primary_after)
    phase.lost, phase.unacked_present, phase.unknown, details = check_writes(records, expected, actual)
    if phase.lost:
        phase.failures.append(f"{phase.lost} acknowledged write(s) lost: " + "; ".join(details[:2]))
    changed = [key for key, value in settled.items() if actual.get(key, "missing row") != value]
    if changed:
        phase.failures.append(f"{len(changed)} link(s) of earlier phases changed or lost, e.g. "
                              f"{changed[0][0]} {changed[0][1]}: was {settled[changed[0]]}, "
                              f"now {actual.get(changed[0], 'missing row')}")
    settled.update(expected)
    if service_start_time() != SERVICE_STARTED:
        phase.failures.append("the service process is gone or was restarted")
    report_phase(phase)
    return phase


def summarize(phase, records, health, start, end):
    phase.requests = len(records)
    failed = sorted((r for r in records if r.code != "OK"), key=lambda r: r.end)
    for record in failed:
        phase.codes[record.code] += 1
    if failed:
        phase.first_failure = failed[0].end
        phase.last_failure = failed[-1].end
        # The first success of a request sent after the first failure (a
        # request in flight before it may still end OK a moment later).
        later_oks = [r.end for r in records if r.code == "OK" and r.start > phase.first_failure]
        if later_oks:
            phase.window = min(later_oks) - phase.first_failure
        oks_after_last = [r.end for r in records if r.code == "OK" and r.end > phase.last_failure]
        if oks_after_last:
            phase.span = min(oks_after_last) - phase.first_failure
        if phase.recovered_ok and oks_after_last and phase.action is not None:
            phase.recovered_after = min(oks_after_last) - phase.action
    elif phase.recovered_ok:
        phase.recovered_after = 0.0
    bad = {code: n for code, n in phase.codes.items() if code not in RETRYABLE}
    cancelled_timeouts = sum(1 for r in failed if r.code == "CANCELLED" and "Timeout expired" in r.message)
    if cancelled_timeouts and cancelled_timeouts == bad.get("CANCELLED"):
        # tonic's own timeout: the call ended without a verdict, like a
        # client-side DEADLINE_EXCEEDED (README, Deadlines). Counted, allowed.
        del bad["CANCELLED"]
        phase.notes.append(f"{cancelled_timeouts} CANCELLED 'Timeout expired' (no verdict, allowed)")
    if bad:
        examples = {}
        for record in failed:
            if record.code in bad and record.code not in examples:
                examples[record.code] = record.message
        described = ", ".join(f"{code} x{n} ('{examples[code][:80]}')" for code, n in sorted(bad.items()))
        phase.failures.insert(0, f"non-retryable code(s): {described}")
    origin = phase.fault if phase.fault is not None else start
    phase.flips = [(t - origin, s) for t, s in health.flips if start <= t <= end]


def fmt_flips(flips):
    return " ".join(f"{state}@{t:+.1f}s" for t, state in flips) or "no flip"


def fmt_codes(codes):
    return " ".join(f"{code}x{n}" for code, n in sorted(codes.items())) or "none failed"


def report_phase(phase):
    origin = phase.fault
    for t, what in phase.events:
        say(f"  {t - origin:+6.2f}s  {what}")
    if phase.first_failure is not None:
        window = f"{phase.window:.2f} s" if phase.window is not None else "no success after it"
        span = f"{phase.span:.2f} s" if phase.span is not None else "no success after it"
        say(f"  window (first failure -> first success of a request sent after it): {window}; "
            f"first failure {phase.first_failure - origin:+.2f}s, last failure {phase.last_failure - origin:+.2f}s; "
            f"span (first failure -> first success after the last failure): {span}")
    else:
        say("  no request failed")
    say(f"  answers: {phase.requests}, failed: {fmt_codes(phase.codes)}")
    say(f"  readiness: {fmt_flips(phase.flips)}")
    if phase.recovered_after is not None:
        say(f"  recovered {phase.recovered_after:.2f} s after the {phase.action_name}")
    say(f"  acknowledged writes lost: {phase.lost}; unacknowledged but present: {phase.unacked_present} "
        f"(of {phase.unknown} answers with an unknown outcome)")
    for note in phase.notes:
        say(f"  note: {note}")
    for failure in phase.failures:
        say(f"  FAIL: {failure}")


def phase_restart(phase, load):
    load.faulted.set()
    phase.fault = now()
    phase.event("pg_ctl restart -m fast (primary a)")
    phase.action, phase.action_name = phase.fault, "restart"
    pg_ctl("restart", "-D", DATA["a"], "-m", "fast", "-w", "-t", "30", "-l", PG_LOG["a"])
    phase.event("pg_ctl: primary a accepts connections again")


def phase_failover(phase, load):
    wait_sync_standby("a")
    load.faulted.set()
    phase.fault = now()
    killed = kill9_instance("a")
    phase.event(f"kill -9 primary a (postmaster and {len(killed) - 1} children)")
    wait_dead(killed)
    time.sleep(1.0)  # the operator notices
    pg_ctl("promote", "-D", DATA["b"], "-w", "-t", "30")
    phase.action, phase.action_name = now(), "promotion"
    phase.event("standby b promoted")
    endpoint(ready="b", maint="a")
    phase.event("endpoint moved to b")


def phase_read_only(phase, load):
    load.faulted.set()
    phase.fault = now()
    endpoint(ready="a", maint="b")
    phase.event("endpoint moved to a (read-only)")
    wait_proxy_check("a")
    phase.event("HAProxy's primary check passes for a")
    ended = psql(PORT["b"], "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = 'drill' AND backend_type = 'client backend' "
                            "AND pid <> pg_backend_pid()").strip()
    phase.event(f"the service's {ended} session(s) on b ended (pg_terminate_backend)")
    time.sleep(READ_ONLY_MOMENT)
    on_a = psql(PORT["a"], "SELECT count(*) FROM pg_stat_activity WHERE datname = 'drill' "
                           "AND backend_type = 'client backend' AND pid <> pg_backend_pid()").strip()
    endpoint(ready="b", maint="a")
    phase.action, phase.action_name = now(), "move back"
    phase.event(f"endpoint moved back to b; the service held {on_a} session(s) on a (not cut)")
    refused = sum(1 for r in load.records() if phase.fault <= r.end <= phase.action and r.code != "OK")
    if int(on_a) == 0 and refused == 0:
        raise DrillError("the service never reached the read-only server: the phase tested nothing")


def main():
    global SERVICE_STARTED
    SERVICE_STARTED = service_start_time()
    if SERVICE_STARTED is None:
        raise DrillError("the service is not running")
    health = HealthWatch()
    health.start()
    deadline = time.monotonic() + 30
    while health.state != "SERVING":
        if time.monotonic() > deadline or service_start_time() is None:
            raise DrillError(f"the service did not become ready (readiness {health.state})")
        time.sleep(0.05)
    steps = [("restart", phase_restart, "a"), ("failover", phase_failover, "b"),
             ("read-only", phase_read_only, "b")]
    say(f"service ready after {now():.1f} s; seeding through the proxy, for each phase and each of "
        f"{WORKERS} workers: {IDENTITIES_PER_WORKER} identities before the fault and {IDENTITIES_PER_WORKER} "
        f"after, each with {CHANNELS_PER_IDENTITY} mailboxes and {CHANNELS_PER_IDENTITY} phone numbers")
    plans = seed([name for name, _, _ in steps])
    settled = {}  # (handle, kind) -> what the check of its phase found

    phases = []
    for name, fault, primary_after in steps:
        if name == "read-only":
            # The old primary comes back as something that accepts
            # connections but refuses writes (a demoted primary).
            pg_ctl("start", "-D", DATA["a"], "-w", "-t", "30", "-l", PG_LOG["a"],
                   "-o", "-c default_transaction_read_only=on")
            state = psql(PORT["a"], "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')",
                         database="postgres").strip()
            if state != "f|on":
                raise DrillError(f"a is not the read-only non-standby it should be ({state})")
            say("old primary a back with default_transaction_read_only=on (not in recovery: it passes "
                "HAProxy's primary check, yet refuses writes)")
        phase = run_phase(Phase(name), plans[name], health, settled, primary_after, fault)
        phases.append(phase)
        if phase.failures and not phase.recovered_ok:
            say(f"phase {name} did not recover: the later phases are skipped")
            break
    health.stopped.set()

    panics = service_log_count("panicked")
    total = SETUP_SECONDS + now()
    print()
    print(f"{'phase':<10} {'answers':>7} {'window_s':>8} {'span_s':>6} {'recov_s':>7} {'lost':>4} {'unacked':>7}  "
          f"{'failed answers':<34} {'readiness':<36} verdict")
    for p in phases:
        window = f"{p.window:.2f}" if p.window is not None else ("-" if p.first_failure is None else "never")
        span = f"{p.span:.2f}" if p.span is not None else ("-" if p.first_failure is None else "never")
        recov = f"{p.recovered_after:.2f}" if p.recovered_after is not None else "never"
        unacked = f"{p.unacked_present}/{p.unknown}"
        print(f"{p.name:<10} {p.requests:>7} {window:>8} {span:>6} {recov:>7} {p.lost:>4} {unacked:>7}  "
              f"{fmt_codes(p.codes):<34} {fmt_flips(p.flips):<36} {'FAIL' if p.failures else 'ok'}")
    for name, _, _ in steps[len(phases):]:
        print(f"{name:<10} {'skipped':>7}")
    print()
    results = {
        "phases": [{k: v for k, v in vars(p).items() if k not in ("codes",)} | {"codes": dict(p.codes)}
                   for p in phases],
        "service_panics": panics,
    }
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    failures = [f"phase {p.name}: {failure}" for p in phases for failure in p.failures]
    if panics:
        failures.append(f"the service logged {panics} panic(s)")
    if service_start_time() != SERVICE_STARTED:
        failures.append("the service process is gone or was restarted")
    if len(phases) < len(steps):
        failures.append(f"phase(s) skipped: {', '.join(n for n, _, _ in steps[len(phases):])}")
    if failures:
        for failure in failures:
            say(f"FAILED: {failure}")
        say(f"drill FAILED after {total:.0f} s (setup {SETUP_SECONDS} s); details in {WORK}")
        return 1
    say(f"drill passed in {total:.0f} s (setup {SETUP_SECONDS} s): the service process "
        f"(pid {SERVICE_PID}) was never restarted; no acknowledged write was lost")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DrillError as error:
        say(f"FAILED: drill error: {error}")
        sys.exit(2)
    except Exception as error:  # a bug of the drill: say so in one line too
        import traceback
        traceback.print_exc()
        say(f"FAILED: drill error: {type(error).__name__}: {error}")
        sys.exit(2)
