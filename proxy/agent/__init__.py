"""``infermon agent``: one per node, NVML GPU and psutil host metrics on its own /metrics port.

Modules: :mod:`config` (schema), :mod:`nvml` (GPU session and readers), :mod:`events` (XID thread),
:mod:`gpu` (the GPU collector), :mod:`podmap` (PID -> pod), :mod:`host` (psutil), :mod:`families`
(snapshot building), :mod:`worker` (the collection thread), :mod:`server` (aiohttp), :mod:`command`.
"""
