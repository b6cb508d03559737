"""``infermon inject FILE|-``: the manifests on stdout with the infermon sidecar added (docs/kubernetes.md).

Exit statuses: 0 written, 1 a document was refused (nothing written; one line per refusal on
stderr), 2 bad usage (an unreadable file, a bad flag value).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from proxy.errors import ConfigError


def _port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number from 1 to 65535")
    return int(value)


def register(subparsers: Any) -> None:
    from proxy.deploy.inject import ADMIN_PORT, DEFAULT_IMAGE, PROXY_PORT, SUPPORTED

    p: argparse.ArgumentParser = subparsers.add_parser(
        "inject",
        help="add the infermon sidecar to Kubernetes manifests",
        description="Read Kubernetes manifests (multi-document YAML) and write them to stdout with infermon "
        f"added beside the model server of each pod template ({SUPPORTED}). The model server keeps its "
        "port; infermon takes over the port's name, and the Services in the input that reached the model's port "
        "are pointed at infermon's (by number for a native sidecar: before Kubernetes 1.32 a Service finds no "
        "port of a native sidecar by name). "
        "Comments and unknown fields are kept; injecting twice changes nothing. See docs/kubernetes.md.",
    )
    p.add_argument("file", metavar="FILE|-", help="a YAML file, or - for standard input")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"the infermon image (default {DEFAULT_IMAGE})")
    p.add_argument("--container", metavar="NAME", help="the model server's container (default: the only one)")
    p.add_argument("--port", metavar="NAME|NUMBER", help="the model server's port (default: its only port)")
    p.add_argument(
        "--proxy-port", type=_port, default=PROXY_PORT, help=f"where infermon listens in the pod (default {PROXY_PORT})"
    )
    p.add_argument(
        "--admin-port",
        type=_port,
        default=ADMIN_PORT,
        help=f"infermon's /metrics, /healthz, /readyz (default {ADMIN_PORT})",
    )
    p.add_argument(
        "--sidecar",
        choices=["auto", "native", "classic"],
        default="auto",
        help="native: an init container with restartPolicy Always (Kubernetes 1.29+), started before and "
        "stopped after the model server; classic: one more container (older clusters); auto (default): "
        "native, classic for a KServe InferenceService",
    )
    p.add_argument(
        "--config-map",
        metavar="NAME",
        help="a ConfigMap with infermon.yaml, mounted at /etc/infermon (INFERMON_CONFIG)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from proxy.deploy.inject import InjectError, InjectOptions, inject_text

    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise ConfigError(f"infermon inject: cannot read {args.file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"infermon inject: {args.file} is not UTF-8 text") from None
    try:
        options = InjectOptions(
            image=args.image,
            container=args.container,
            port=args.port,
            proxy_port=args.proxy_port,
            admin_port=args.admin_port,
            sidecar=args.sidecar,
            config_map=args.config_map,
        )
    except InjectError as exc:
        raise ConfigError(f"infermon inject: {exc}") from None
    try:
        result = inject_text(text, options)
    except InjectError as exc:
        for line in str(exc).splitlines():
            print(f"infermon inject: {line}", file=sys.stderr)
        return 1
    sys.stdout.write(result.text)
    for note in result.notes:
        print(note, file=sys.stderr)
    return 0
