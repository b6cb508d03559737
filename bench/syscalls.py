"""What a server asks of the kernel per request: syscall counts, write sizes, socket options, wake-ups.

Used by ``python -m bench.run --strace`` and ``--perf``. For one server process tree under ``wrk -c32``:

- `count`: ``strace -c -f -p PID...`` for a few seconds of load; calls (and errors) of each syscall
  divided by the requests wrk completed meanwhile.
- `sample`: ``strace -f -yy -e trace=<I/O and epoll calls>`` for a shorter while; the first few
  hundred completed calls, grouped by syscall and by side (the client connection wrk reaches, the
  upstream connection, other), with the bytes each moved and the events each epoll wait returned.
- `socket_options`: TCP_NODELAY, TCP_CORK and the buffer sizes of the server's TCP sockets, read from
  the live process: each socket is copied into this process with ``pidfd_getfd(2)`` (needs ptrace
  rights over it, as strace does) and asked with ``getsockopt``; its addresses come from
  ``/proc/net/tcp``.

- `PerfRecord` and `profile`: ``perf record -e cpu-clock -g`` of a wrk run, read back as the time
  per request spent in the kernel and under a few kernel functions that tell where it goes (the
  write path, the receive path loopback runs inline in the writer, waking the reader, switching).
- `PerfStat`: ``perf stat`` of syscall and scheduler tracepoints for a wrk run at full speed:
  syscalls by name, the wake-ups the server makes (``sched:sched_wakeup`` fired in its context: a
  write that woke the upstream or wrk) and the times it was switched out (``sched:sched_switch``).

strace stops the traced process at every syscall, so it runs several times slower meanwhile: counts
per request that depend on timing (epoll waits, which gather more events per call when the server is
slow) are lower than without strace; counts that follow from the protocol (reads, writes per request
when no message is split) are not. Run the same way for every server, the table compares them fairly.
perf's tracepoint counters do not slow the server measurably, so its counts are those of a normal run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

STRACE = shutil.which("strace") or "/usr/bin/strace"
MISSING = "strace is missing: install the Debian package strace (apt-get install strace), or drop --strace"

#: the calls the sample traces: every way a socket is read or written, and every way to wait for events
SAMPLED = (
    "read",
    "write",
    "readv",
    "writev",
    "recvfrom",
    "sendto",
    "recvmsg",
    "sendmsg",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
)
EPOLL = frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2"})

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture since 5.6
TCP_CORK = getattr(socket, "TCP_CORK", 3)


PERF = shutil.which("perf") or "/usr/bin/perf"
TRACEFS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
PERF_SYSCALLS = (*SAMPLED, "epoll_ctl", "getsockopt", "setsockopt", "accept4", "io_uring_enter", "futex")
#: perf counter -> the name the report gives it
PERF_EVENTS = {
    "raw_syscalls:sys_enter": "syscalls (all)",
    **{f"syscalls:sys_enter_{name}": name for name in PERF_SYSCALLS},
    "sched:sched_wakeup": "wake-ups made",
    "sched:sched_switch": "switched out",
}


class StraceFailed(RuntimeError):
    """strace (or perf) could not attach or printed nothing to read."""


def available() -> str | None:
    """None when strace can run here, else the reason (what to install)."""
    if not Path(STRACE).exists():
        return MISSING
    return None


def perf_available() -> str | None:
    """None when perf can count syscall tracepoints here, else what is missing and how to get it."""
    if not Path(PERF).exists():
        return "perf is missing: install the Debian package linux-perf, or drop --perf"
    if not any((root / "events" / "syscalls").is_dir() for root in TRACEFS):
        return (
            "perf needs the syscall tracepoints: mount tracefs (mount -t tracefs nodev /sys/kernel/tracing) "
            "on a kernel with CONFIG_FTRACE_SYSCALLS, or drop --perf"
        )
    return None


def perf_events() -> list[str]:
    """The tracepoints of PERF_EVENTS that this kernel has."""
    root = next((r for r in TRACEFS if (r / "events" / "syscalls").is_dir()), TRACEFS[0])
    return [event for event in PERF_EVENTS if (root / "events" / event.replace(":", "/")).is_dir()]


def parse_perf(text: str) -> dict[str, int]:
    """``perf stat -x,`` output: event -> count (events perf could not count are left out)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) < 3 or line.startswith("#"):
            continue
        value, event = parts[0], parts[2]
        if value.isdigit():
            counts[event] = int(value)
    return counts


def _stop(proc: subprocess.Popen[bytes], out: Path, timeout: float) -> str:
    """SIGINT to a tracing tool's process group (it detaches and writes its summary), SIGKILL after
    ``timeout``; then what it wrote to ``out`` ("" when unreadable or binary)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5.0)
    try:
        return out.read_text(errors="replace")
    except (OSError, UnicodeDecodeError):
        return ""


class _Perf:
    """A perf command attached to running processes until `stop` (SIGINT, as Ctrl-C would)."""

    def __init__(self, what: str, argv: list[str], out: Path) -> None:
        self.out = out
        self.log = out.with_suffix(".stderr")
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
            )
        # perf says nothing when it has attached; it takes milliseconds, and an error ends it at once
        time.sleep(0.3)
        if self.proc.poll() is not None:
            raise StraceFailed(f"{what} exited with status {self.proc.returncode}: {self.failure()}")

    def stop(self, timeout: float = 30.0) -> str:
        """End it and return what it wrote to `out` (empty for a binary file)."""
        return _stop(self.proc, self.out, timeout)

    def failure(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-800:]
        except OSError:
            return ""


class PerfStat(_Perf):
    """``perf stat -e <tracepoints> -p PIDS`` until `stop`."""

    def __init__(self, pids: list[int], out: Path, events: list[str]) -> None:
        argv = [PERF, "stat", "-x,", "-o", str(out), "-e", ",".join(events), "-p", ",".join(map(str, pids))]
        super().__init__(f"perf stat on {pids}", argv, out)


class PerfRecord(_Perf):
    """``perf record -e cpu-clock -g -p PIDS`` until `stop`: sampled stacks, kernel frames included."""

    def __init__(self, pids: list[int], out: Path, frequency: int = 2000) -> None:
        argv = [PERF, "record", "-q", "-e", "cpu-clock", "-F", str(frequency), "-g", "-o", str(out)]
        argv += ["-p", ",".join(map(str, pids))]
        super().__init__(f"perf record on {pids}", argv, out)


# --- strace -c --------------------------------------------------------------------------------------


@dataclass
class SyscallCount:
    name: str
    calls: int
    errors: int
    seconds: float  # time strace measured inside the call (inflated by tracing; a share, not a cost)


_COUNT_ROW = re.compile(r"^\s*[\d.]+\s+([\d.]+)\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


#: kernel functions whose time (callees included) the profile reports -> what it stands for
PROFILED = {
    "do_syscall_64": "all syscalls",
    "tcp_sendmsg": "writes",
    "handle_softirqs": "loopback receive, run inline",
    "sock_def_readable": "waking the reader",
    "tcp_recvmsg": "reads",
    "__schedule": "context switches",
}


@dataclass
class Profile:
    cpu_s: float  # sampled CPU time of the processes (perf's event count)
    kernel_share: float  # of it, in the kernel (0..1)
    under: dict[str, float]  # PROFILED function -> share of cpu_s spent in it and its callees


_CHILDREN = re.compile(r"^\s*([\d.]+)%\s+([\d.]+)%\s+\[k\]\s+(\S+)")
_DSO = re.compile(r"^\s*([\d.]+)%\s+\[kernel\.kallsyms\]")
_EVENTS = re.compile(r"^# Event count \(approx\.\): (\d+)")


def profile(data: Path, timeout: float = 120.0) -> Profile:
    """Read a `PerfRecord` file back with perf report (cpu-clock periods are nanoseconds)."""

    def report(*options: str) -> str:
        argv = [PERF, "report", "-i", str(data), "--stdio", "-g", "none", *options]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False).stdout

    return parse_profile(report("--children", "--sort", "sym"), report("--no-children", "--sort", "dso"))


def parse_profile(by_symbol: str, by_dso: str) -> Profile:
    """perf report's ``--children --sort sym`` and ``--no-children --sort dso`` text, read back."""
    events = next((int(m.group(1)) for m in map(_EVENTS.match, by_symbol.splitlines()) if m), 0)
    under: dict[str, float] = {}
    for line in by_symbol.splitlines():
        m = _CHILDREN.match(line)
        if m and m.group(3) in PROFILED and m.group(3) not in under:
            under[m.group(3)] = float(m.group(1)) / 100
    kernel = next((float(m.group(1)) / 100 for m in map(_DSO.match, by_dso.splitlines()) if m), 0.0)
    return Profile(cpu_s=events / 1e9, kernel_share=kernel, under=under)


def parse_count(text: str) -> list[SyscallCount]:
    """The rows of ``strace -c``'s table (not the total), most calls first."""
    rows: list[SyscallCount] = []
    for line in text.splitlines():
        m = _COUNT_ROW.match(line)
        if m is None or m.group(4) == "total":
            continue
        rows.append(SyscallCount(m.group(4), int(m.group(2)), int(m.group(3) or 0), float(m.group(1))))
    rows.sort(key=lambda row: (-row.calls, row.name))
    return rows


# --- strace -yy sample ------------------------------------------------------------------------------


@dataclass
class SampledCall:
    pid: int
    name: str
    fd: str  # strace's -yy description of the first argument, e.g. TCP:[127.0.0.1:1->127.0.0.1:2]
    result: int  # the return value; -1 for an error
    error: str = ""  # e.g. EAGAIN
    iov: int = 0  # writev/readv: the number of buffers


_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")
_RESULT = re.compile(r"\)\s+=\s+(-?\d+|\?)(?:\s+(E[A-Z]+))?")
_FD = re.compile(r"^\d+<((?:->|[^>])*)>")  # the "->" of a socket's addresses is not its end
_IOV_COUNT = re.compile(r"\],\s*(\d+)\)\s+=")


def parse_sample(text: str, limit: int) -> list[SampledCall]:
    """The first `limit` completed calls of ``strace -f -yy`` output (unfinished ones joined)."""
    calls: list[SampledCall] = []
    pending: dict[int, tuple[str, str]] = {}
    for line in text.splitlines():
        if len(calls) >= limit:
            break
        resumed = _RESUMED.match(line)
        if resumed is not None:
            pid = int(resumed.group(1))
            begun = pending.pop(pid, None)
            if begun is None or begun[0] != resumed.group(2):
                continue
            name, args = begun[0], begun[1] + resumed.group(3)
        else:
            m = _CALL.match(line)
            if m is None:
                continue
            pid, name, args = int(m.group(1)), m.group(2), m.group(3)
            if args.endswith("<unfinished ...>"):
                pending[pid] = (name, args[: -len("<unfinished ...>")])
                continue
        result = _RESULT.search(args)
        if result is None or result.group(1) == "?":
            continue
        fd = _FD.match(args)
        iov = _IOV_COUNT.search(args) if name in ("writev", "readv", "sendmsg", "recvmsg") else None
        calls.append(
            SampledCall(
                pid=pid,
                name=name,
                fd=fd.group(1) if fd else "",
                result=int(result.group(1)),
                error=result.group(2) or "",
                iov=int(iov.group(1)) if iov else 0,
            )
        )
    return calls


_TCP = re.compile(r"^TCP:\[([\d.]+):(\d+)->([\d.]+):(\d+)\]$")


def side(fd: str, listen_port: int, upstream_port: int | None) -> str:
    """'client' (the connection wrk made), 'upstream', or another kind of file."""
    m = _TCP.match(fd)
    if m is None:
        return "epoll" if fd.startswith("anon_inode:[eventpoll]") else (fd.split(":", 1)[0] or "other")
    if int(m.group(2)) == listen_port:
        return "client"
    if upstream_port is not None and int(m.group(4)) == upstream_port:
        return "upstream"
    return "tcp-other"


@dataclass
class SampleGroup:
    """Calls of one syscall on one side: how many, how many failed, and what they returned."""

    name: str
    side: str
    calls: int
    errors: int
    median: float  # bytes moved (I/O) or events returned (epoll), over the calls that succeeded
    low: int
    high: int
    iov_median: float = 0.0


def summarize_sample(calls: list[SampledCall], listen_port: int, upstream_port: int | None) -> list[SampleGroup]:
    groups: dict[tuple[str, str], list[SampledCall]] = {}
    for call in calls:
        where = "-" if call.name in EPOLL else side(call.fd, listen_port, upstream_port)
        groups.setdefault((call.name, where), []).append(call)
    out: list[SampleGroup] = []
    for (name, where), group in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        ok = [c.result for c in group if c.result >= 0]
        iovs = [c.iov for c in group if c.iov]
        out.append(
            SampleGroup(
                name=name,
                side=where,
                calls=len(group),
                errors=len(group) - len(ok),
                median=statistics.median(ok) if ok else 0.0,
                low=min(ok, default=0),
                high=max(ok, default=0),
                iov_median=statistics.median(iovs) if iovs else 0.0,
            )
        )
    return out


# --- running strace ---------------------------------------------------------------------------------


class Strace:
    """strace attached to `pids` (all their threads) until `stop`; output in `out`."""

    def __init__(self, pids: list[int], out: Path, options: list[str], attach_timeout: float = 10.0) -> None:
        self.out = out
        self.log = out.with_suffix(".stderr")
        argv = [STRACE, "-f", "-o", str(out), *options]
        for pid in pids:
            argv += ["-p", str(pid)]
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
            )
        deadline = time.monotonic() + attach_timeout
        while self.log.read_text(errors="replace").count(" attached") < len(pids):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StraceFailed(f"strace did not attach to {pids}: {self.log.read_text(errors='replace')[-800:]}")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> str:
        """Detach (SIGINT, as Ctrl-C would) and return what strace wrote to `out`."""
        return _stop(self.proc, self.out, timeout)


def counting(pids: list[int], out: Path) -> Strace:
    """strace -c -f: a syscall table when stopped."""
    return Strace(pids, out, ["-c"])


def sampling(pids: list[int], out: Path) -> Strace:
    """strace -f -yy of the I/O and epoll calls, buffers not printed."""
    return Strace(pids, out, ["-yy", "-s", "0", "-e", "signal=none", "-e", f"trace={','.join(SAMPLED)}"])


# --- socket options ---------------------------------------------------------------------------------


@dataclass
class SocketOptions:
    """One TCP socket of the server and what getsockopt said about it."""

    side: str
    local: str
    remote: str
    nodelay: int
    cork: int
    sndbuf: int
    rcvbuf: int


@dataclass
class SideOptions:
    """Sockets of one side (client, upstream, listen) summarized."""

    side: str
    sockets: int
    nodelay: int  # how many have TCP_NODELAY set
    cork: int
    sndbuf: list[int] = field(default_factory=list)  # the distinct values
    rcvbuf: list[int] = field(default_factory=list)


def _tcp_table() -> dict[int, tuple[str, str, str]]:
    """inode -> (local, remote, state) for every IPv4 TCP socket of the machine."""
    table: dict[int, tuple[str, str, str]] = {}
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return table
    for line in lines:
        parts = line.split()
        if len(parts) < 10:
            continue
        table[int(parts[9])] = (_address(parts[1]), _address(parts[2]), parts[3])
    return table


def _address(hex_address: str) -> str:
    ip, port = hex_address.split(":")
    return f"{socket.inet_ntoa(bytes.fromhex(ip)[::-1])}:{int(port, 16)}"


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    new = int(libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
    if new < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return new


def socket_options(pids: list[int], listen_port: int, upstream_port: int | None) -> list[SocketOptions]:
    """Options of every TCP socket the processes hold (read while connections are open)."""
    table = _tcp_table()
    found: list[SocketOptions] = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            for name in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{name}")
                except OSError:
                    continue
                if not target.startswith("socket:["):
                    continue
                entry = table.get(int(target[8:-1]))
                if entry is None:
                    continue
                local, remote, state = entry
                if state == "0A":
                    where = "listen"
                else:
                    port_local, port_remote = int(local.rsplit(":", 1)[1]), int(remote.rsplit(":", 1)[1])
                    where = (
                        "client"
                        if port_local == listen_port
                        else "upstream"
                        if port_remote == upstream_port
                        else "tcp-other"
                    )
                try:
                    copy = _pidfd_getfd(pidfd, int(name))
                except OSError:
                    continue
                sock = socket.socket(fileno=copy)
                try:
                    found.append(
                        SocketOptions(
                            side=where,
                            local=local,
                            remote=remote,
                            nodelay=sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                            cork=sock.getsockopt(socket.IPPROTO_TCP, TCP_CORK),
                            sndbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                            rcvbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                        )
                    )
                except OSError:
                    pass
                finally:
                    sock.close()  # our copy only; the server's descriptor stays open
        finally:
            os.close(pidfd)
    return found


def summarize_options(found: list[SocketOptions]) -> list[SideOptions]:
    sides: dict[str, list[SocketOptions]] = {}
    for item in found:
        sides.setdefault(item.side, []).append(item)
    order = {"client": 0, "upstream": 1, "listen": 2}
    return [
        SideOptions(
            side=name,
            sockets=len(items),
            nodelay=sum(1 for i in items if i.nodelay),
            cork=sum(1 for i in items if i.cork),
            sndbuf=sorted({i.sndbuf for i in items}),
            rcvbuf=sorted({i.rcvbuf for i in items}),
        )
        for name, items in sorted(sides.items(), key=lambda kv: (order.get(kv[0], 9), kv[0]))
    ]
