"""bench.syscalls: reading strace and perf output, and socket options of a live process."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from bench import syscalls

# strace 6.1 -c -f, as it ends a run (trimmed)
COUNT = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 60.10    0.114682           2     40120           write
 30.02    0.057000           1     40118        12 read
  0.50    0.000950          70        13           epoll_pwait
------ ----------- ----------- --------- --------- ----------------
100.00    0.172632           2     80251        12 total
"""

# strace 6.1 -f -yy -s 0 of infermon and of a two-threaded process (unfinished and resumed calls)
SAMPLE = """\
16781 read(26<TCP:[127.0.0.1:59385->127.0.0.1:41858]>, ""..., 256000) = 41
16781 write(37<TCP:[127.0.0.1:40276->127.0.0.1:36445]>, ""..., 200) = 200
16781 read(37<TCP:[127.0.0.1:40276->127.0.0.1:36445]>, ""..., 256000) = 174
16781 write(26<TCP:[127.0.0.1:59385->127.0.0.1:41858]>, ""..., 202) = 202
16781 read(27<TCP:[127.0.0.1:59385->127.0.0.1:41860]>, ""..., 256000) = -1 EAGAIN (Resource temporarily unavailable)
16781 epoll_pwait(3<anon_inode:[eventpoll]>, [...], 1024, 64, NULL, 8) = 32
16780 writev(11<TCP:[127.0.0.1:59385->127.0.0.1:60306]>, [...], 2) = 174
9944  recvfrom(4<TCP:[127.0.0.1:49615->127.0.0.1:59385]>,  <unfinished ...>
9897  sendto(5<TCP:[127.0.0.1:59385->127.0.0.1:49615]>, ""..., 10, 0, NULL, 0) = 10
9944  <... recvfrom resumed>""..., 100, 0, NULL, NULL) = 10
16781 write(26<TCP:[127.0.0.1:59385->127.0.0.1:41858]>, ""..., 202
"""

PERF = """\
# started on Tue Dec  1 09:29:46 2026

109,,raw_syscalls:sys_enter,652835,100.00,166.964,K/sec
3,,syscalls:sys_enter_read,652835,100.00,4.595,K/sec
<not counted>,,sched:sched_switch,0,0.00,,
0,,sched:sched_wakeup,652835,100.00,0.000,/sec
"""


def test_parse_count_reads_every_row_but_the_total() -> None:
    rows = syscalls.parse_count(COUNT)
    found = [(r.name, r.calls, r.errors) for r in rows]
    assert found == [("write", 40120, 0), ("read", 40118, 12), ("epoll_pwait", 13, 0)]
    assert rows[0].seconds == pytest.approx(0.114682)


def test_parse_sample_joins_resumed_calls_and_keeps_errors() -> None:
    calls = syscalls.parse_sample(SAMPLE, limit=100)
    assert [(c.name, c.result) for c in calls] == [
        ("read", 41),
        ("write", 200),
        ("read", 174),
        ("write", 202),
        ("read", -1),
        ("epoll_pwait", 32),
        ("writev", 174),
        ("sendto", 10),
        ("recvfrom", 10),
    ]  # the last write never finished: left out
    assert calls[4].error == "EAGAIN"
    assert calls[6].iov == 2
    assert calls[8].fd == "TCP:[127.0.0.1:49615->127.0.0.1:59385]"
    assert len(syscalls.parse_sample(SAMPLE, limit=3)) == 3


def test_summarize_sample_tells_client_from_upstream() -> None:
    groups = syscalls.summarize_sample(syscalls.parse_sample(SAMPLE, limit=100), listen_port=59385, upstream_port=36445)
    found = {(g.name, g.side): g for g in groups}
    assert found["write", "upstream"].median == 200
    assert found["write", "client"].median == 202
    assert found["read", "client"].calls == 2
    assert found["read", "client"].errors == 1
    assert found["read", "upstream"].median == 174
    assert found["epoll_pwait", "-"].median == 32
    assert found["writev", "client"].iov_median == 2
    assert found["recvfrom", "tcp-other"].calls == 1  # a connection the server made elsewhere


def test_parse_perf_keeps_counted_events() -> None:
    assert syscalls.parse_perf(PERF) == {
        "raw_syscalls:sys_enter": 109,
        "syscalls:sys_enter_read": 3,
        "sched:sched_wakeup": 0,
    }


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    """(listener, accepted, client) on 127.0.0.1; TCP_NODELAY set on the accepted side only."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=5.0)
    accepted, _ = listener.accept()
    accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    try:
        yield listener, accepted, client
    finally:
        for sock in (client, accepted, listener):
            sock.close()


def test_socket_options_of_a_live_process(connection: tuple[socket.socket, socket.socket, socket.socket]) -> None:
    listener, accepted, _ = connection
    pidfd = os.pidfd_open(os.getpid())
    try:
        os.close(syscalls._pidfd_getfd(pidfd, accepted.fileno()))
    except OSError as exc:
        pytest.skip(f"pidfd_getfd is not available here: {exc}")
    finally:
        os.close(pidfd)
    port = listener.getsockname()[1]
    found = syscalls.socket_options([os.getpid()], listen_port=port, upstream_port=port)
    ours = [f for f in found if port in (int(f.local.rsplit(":", 1)[1]), int(f.remote.rsplit(":", 1)[1]))]
    by_side = {s.side: s for s in syscalls.summarize_options(ours)}
    assert by_side["client"].sockets == 1  # the accepted socket: its local port is the listen port
    assert by_side["client"].nodelay == 1
    assert by_side["upstream"].sockets == 1  # the connecting socket: its remote port is the "upstream"
    assert by_side["upstream"].nodelay == 0
    assert by_side["listen"].sockets == 1
    assert accepted.fileno() >= 0  # the copies were closed, not ours


# perf 6.1 report --stdio -g none of a cpu-clock recording (trimmed)
BY_SYMBOL = """\
# Samples: 11K of event 'cpu-clock'
# Event count (approx.): 2271254160
#
# Children      Self  Symbol
# ........  ........  ..........
#
    34.97%     0.00%  [.] 0x00007f1914c56240
    26.25%    26.20%  [.] _PyEval_EvalFrameDefault
    23.23%     0.41%  [k] do_syscall_64
    18.29%     0.02%  [k] tcp_sendmsg
    12.21%     0.21%  [k] handle_softirqs
     0.92%     0.04%  [k] __schedule
"""
BY_DSO = """\
# Overhead  Shared Object
# ........  .............
#
    61.17%  libpython3.11.so.1.0
    23.38%  [kernel.kallsyms]
"""


def test_parse_profile_reads_time_under_kernel_functions() -> None:
    found = syscalls.parse_profile(BY_SYMBOL, BY_DSO)
    assert found.cpu_s == pytest.approx(2.271254160)
    assert found.kernel_share == pytest.approx(0.2338)
    assert found.under == {
        "do_syscall_64": pytest.approx(0.2323),
        "tcp_sendmsg": pytest.approx(0.1829),
        "handle_softirqs": pytest.approx(0.1221),
        "__schedule": pytest.approx(0.0092),
    }
