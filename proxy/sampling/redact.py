"""Redaction: what never leaves the process with a sample (sinks, /drift, logs).

JSON fields (``sampling.redact_fields``), each either

- a name (``ssn``): that key is removed from every object at any depth, lists included; in the
  tensor protocols a name also matches a column: an Open Inference Protocol tensor of that ``name``
  is removed from the body, and a column of a row of numbers (or of an [N, F] tensor) that the
  reference profile names so is set to null; the feature of that name is never extracted;
- a dotted path (``customer.address.zip``): exactly that key, from the root, each segment an object
  key; a list on the way is looked through (``instances.ssn`` removes ``ssn`` from every object in
  the ``instances`` list).

Header fields: the secrets (:data:`SECRET_HEADERS`) always, plus the names given
(``access_log.redact_headers`` and ``sampling.redact_headers``), case-insensitively.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

#: header fields never copied into a sample, whatever the configuration says
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key", "x-auth-token"}
)


class _Node:
    """One step of the dotted paths: the keys removed here, and where the longer paths go on."""

    __slots__ = ("children", "remove")

    def __init__(self) -> None:
        self.remove: set[str] = set()
        self.children: dict[str, _Node] = {}


def _check_field(field: str) -> list[str]:
    parts = field.split(".")
    if not field or any(not part for part in parts):
        raise ValueError(
            f"sampling.redact_fields: {field!r} is not a field name nor a dotted path "
            "(write a key such as 'ssn' or a path such as 'customer.address.zip')"
        )
    return parts


class Redactor:
    """Removes the configured JSON fields from parsed bodies and the secret header fields."""

    def __init__(self, fields: Iterable[str] = (), headers: Iterable[str] = ()) -> None:
        names: set[str] = set()
        root = _Node()
        for field in fields:
            parts = _check_field(field)
            if len(parts) == 1:
                names.add(parts[0])
                continue
            node = root
            for part in parts[:-1]:
                node = node.children.setdefault(part, _Node())
            node.remove.add(parts[-1])
        self.names = frozenset(names)
        self._root = root
        self._paths = bool(root.children)
        self.header_names = SECRET_HEADERS | {name.lower() for name in headers}

    @property
    def active(self) -> bool:
        """Whether any JSON field is redacted (a body that is not JSON cannot be, then)."""
        return bool(self.names) or self._paths

    def removes(self, name: str) -> bool:
        """Whether a feature (a column, a tensor) of this name is redacted: its base name is a name.

        ``x[3]`` (the fourth value of a vector feature ``x``) is redacted with ``x``.
        """
        if not self.names:
            return False
        if name in self.names:
            return True
        bracket = name.find("[")
        return bracket > 0 and name[:bracket] in self.names

    def covers(self, path: Sequence[str]) -> bool:
        """Whether the value at this key path (object keys from the root) is removed by redaction."""
        if any(part in self.names for part in path):
            return True
        node: _Node | None = self._root
        for part in path:
            if node is None:
                return False
            if part in node.remove:
                return True
            node = node.children.get(part)
        return False

    def redact(self, obj: Any) -> Any:
        """Removes the configured fields from parsed JSON, in place, and returns it.

        Works on any depth without recursion (the caller bounds depth and size beforehand).
        """
        if not self.active or not isinstance(obj, dict | list):
            return obj
        names = self.names
        root: _Node | None = self._root if self._paths else None
        stack: list[tuple[Any, _Node | None]] = [(obj, root)]
        pop = stack.pop
        push = stack.append
        while stack:
            node, path = pop()
            if path is None and not names:
                continue  # off every dotted path, and no name to look for below
            if type(node) is list:
                for item in node:
                    kind = type(item)
                    if kind is dict or kind is list:
                        push((item, path))
                continue
            # an object: drop the keys named, then go on into what stays
            remove = path.remove if path is not None else ()
            doomed = [k for k in node if k in names or k in remove]
            for key in doomed:
                del node[key]
            for key, value in node.items():
                kind = type(value)
                if kind is dict or kind is list:
                    push((value, path.children.get(key) if path is not None else None))
        return obj

    def headers(self, fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The header fields without the redacted ones (names compared case-insensitively)."""
        drop = self.header_names
        return [(name, value) for name, value in fields if name.lower() not in drop]
