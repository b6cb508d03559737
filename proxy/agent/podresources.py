"""Which pod holds which GPU: the kubelet pod-resources API (``v1.PodResourcesLister/List``).

The kubelet serves it on a unix socket, by default ``/var/lib/kubelet/pod-resources/kubelet.sock``;
mount that directory into the agent's pod (read-only is enough). The answer lists, per pod and
container, the device ids the device plugin handed out: for ``nvidia.com/gpu`` those are GPU or MIG
UUIDs (``GPU-...``, ``MIG-...``; time-slicing adds ``::N``), or indexes with the plugin's
``DEVICE_ID_STRATEGY=index``.

It needs the ``grpcio`` package; without it, or without the socket, the feature stays off. The
messages are decoded from the protobuf wire format by hand (five fields of one fixed schema), so no
generated code is needed::

    ListPodResourcesResponse { repeated PodResources pod_resources = 1; }
    PodResources             { string name = 1; string namespace = 2;
                               repeated ContainerResources containers = 3; }
    ContainerResources       { string name = 1; repeated ContainerDevices devices = 2; ... }
    ContainerDevices         { string resource_name = 1; repeated string device_ids = 2; ... }
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("infermon.agent.podresources")

LIST_METHOD = "/v1.PodResourcesLister/List"


@dataclass(frozen=True)
class Allocation:
    namespace: str
    pod: str
    container: str
    resource: str


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def fields(buf: bytes) -> Iterator[tuple[int, bytes | int]]:
    """(field number, value) of a protobuf message: bytes for length-delimited fields, int for varints."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _varint(buf, i)
            yield number, value
        elif wire_type == 2:
            size, i = _varint(buf, i)
            if i + size > len(buf):
                raise ValueError("truncated field")
            yield number, buf[i : i + size]
            i += size
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")


def _text(value: bytes | int) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ""


def parse_list_response(data: bytes, prefix: str = "nvidia.com/") -> dict[str, list[Allocation]]:
    """Device id (``::N`` time-slicing suffix removed) -> the containers it is allocated to."""
    out: dict[str, list[Allocation]] = defaultdict(list)
    for number, pod in fields(data):
        if number != 1 or not isinstance(pod, bytes):
            continue
        name = namespace = ""
        containers = []
        for pnum, pval in fields(pod):
            if pnum == 1:
                name = _text(pval)
            elif pnum == 2:
                namespace = _text(pval)
            elif pnum == 3 and isinstance(pval, bytes):
                containers.append(pval)
        for container in containers:
            cname = ""
            devices = []
            for cnum, cval in fields(container):
                if cnum == 1:
                    cname = _text(cval)
                elif cnum == 2 and isinstance(cval, bytes):
                    devices.append(cval)
            for device in devices:
                resource = ""
                ids = []
                for dnum, dval in fields(device):
                    if dnum == 1:
                        resource = _text(dval)
                    elif dnum == 2:
                        ids.append(_text(dval))
                if not resource.startswith(prefix):
                    continue
                allocation = Allocation(namespace, name, cname, resource)
                for device_id in ids:
                    out[device_id.split("::", 1)[0]].append(allocation)
    return dict(out)


class PodResources:
    """Asks the kubelet once per collection; ``None`` from :meth:`allocations` means "unknown"."""

    def __init__(self, socket_path: str, prefix: str = "nvidia.com/", timeout: float = 2.0) -> None:
        self.socket_path = socket_path
        self._prefix = prefix
        self._timeout = timeout
        self._channel: Any = None
        self._call: Any = None
        self._state = ""  # last logged state, to log changes only

    @property
    def available(self) -> bool:
        return os.path.exists(self.socket_path)

    def allocations(self) -> dict[str, list[Allocation]] | None:
        if not self.available:
            self._note("missing", logging.INFO, "pod-resources socket %s not found: GPU allocations left out")
            return None
        try:
            import grpc  # type: ignore[import-untyped]
        except ImportError:
            self._note("no-grpc", logging.WARNING, "pod-resources (%s) needs the grpcio package: left out")
            return None
        if self._call is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket_path}")
            self._call = self._channel.unary_unary(
                LIST_METHOD, request_serializer=lambda _: b"", response_deserializer=lambda data: data
            )
        try:
            data = self._call(None, timeout=self._timeout)
            result = parse_list_response(data, self._prefix)
        except (grpc.RpcError, ValueError) as exc:
            self._note("error", logging.WARNING, "pod-resources List on %s failed: %s", exc)
            return None
        self._note("ok", logging.INFO, "pod-resources: reading GPU allocations from %s")
        return result

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._call = None

    def _note(self, state: str, level: int, message: str, *extra: object) -> None:
        if state != self._state:
            self._state = state
            log.log(level, message, self.socket_path, *extra)
