"""Golden-request probes: does the model still answer correctly? (docs/probes.md)

``spec`` reads a probe file, ``check`` compares an answer with a probe's expectations, ``runner``
replays the set on an interval against every upstream of a running proxy, ``command`` is
``infermon probe record`` and ``infermon probe check``.
"""
