"""``infermon agent``: one per node, NVML GPU and psutil host metrics on its own /metrics port.

Modules: :mod:`config` (schema), :mod:`metrics` (every metric, and the snapshot batch), :mod:`nvml`
(device discovery and field readers), :mod:`events` (XID thread), :mod:`gpu` (the GPU collector),
:mod:`podmap` (PID -> pod from cgroups), :mod:`podresources` (GPU -> pod from the kubelet),
:mod:`host` (psutil), :mod:`worker` (the collection thread), :mod:`server` (aiohttp),
:mod:`command` (the subcommand) and :mod:`fake` (a simulated NVML for tests and the benchmark).
"""
