"""The servers a benchmark run measures against: nginx (upstream and reverse proxy) and an SSE upstream.

Both nginx roles run from configs generated into the run's temp directory, as non-daemon children
with their own pid file, error log and temp paths, so nothing in /etc/nginx or /var is touched.

Fairness of the nginx reverse proxy against infermon: infermon is one process on one core, so the
nginx proxy gets ``worker_processes 1``; it keeps a pool of upstream connections (``keepalive 64``,
HTTP/1.1, ``Connection ""``) as infermon does; access logging is off in both nginx roles.
``keepalive_requests`` is raised everywhere so no side closes a connection every 1000 requests
(nginx's default) in the middle of a measurement.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import LOOPBACK, Child, Children, wait_for_port

NGINX = "/usr/sbin/nginx"
JSON_BODY = '{"predictions":[[0.1,0.9]]}'

_COMMON = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/{name}.pid;
error_log {dir}/{name}.error.log warn;

events {{
    worker_connections 4096;
    multi_accept on;
}}

http {{
    access_log off;
    server_tokens off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {dir}/{name}-body;
    proxy_temp_path {dir}/{name}-proxy;
    fastcgi_temp_path {dir}/{name}-fastcgi;
    uwsgi_temp_path {dir}/{name}-uwsgi;
    scgi_temp_path {dir}/{name}-scgi;
{http}
}}
"""

UPSTREAM_HTTP = """\
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}"""

PROXY_HTTP = """\
    upstream model {{
        server {host}:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def nginx_config(name: str, directory: Path, http: str) -> str:
    return _COMMON.format(dir=directory, name=name, http=http)


def upstream_config(directory: Path, port: int) -> str:
    """nginx answering every request with a small JSON body (the model server stand-in)."""
    http = UPSTREAM_HTTP.format(host=LOOPBACK, port=port, body=JSON_BODY)
    return nginx_config("upstream", directory, http)


def proxy_config(directory: Path, port: int, upstream_port: int) -> str:
    """nginx as a keep-alive reverse proxy to `upstream_port`, one worker."""
    http = PROXY_HTTP.format(host=LOOPBACK, port=port, upstream_port=upstream_port)
    return nginx_config("proxy", directory, http)


@dataclass
class Server:
    """A started server: its child process and the URL it serves."""

    child: Child
    port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


def start_nginx(children: Children, name: str, directory: Path, config: str, port: int) -> Server:
    conf = directory / f"{name}.conf"
    conf.write_text(config)
    argv = [NGINX, "-p", str(directory), "-c", str(conf), "-e", str(directory / f"{name}.error.log")]
    child = children.start(f"nginx-{name}", argv, directory)
    wait_for_port(LOOPBACK, port, timeout=10.0, child=child)
    return Server(child, port)


def start_sse_upstream(children: Children, directory: Path, port: int) -> Server:
    argv = [sys.executable, "-m", "bench.sse_upstream", "--port", str(port)]
    child = children.start("sse-upstream", argv, directory)
    wait_for_port(LOOPBACK, port, timeout=15.0, child=child)
    return Server(child, port)
