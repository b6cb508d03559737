"""request_duration_seconds carries the trace id of sampled requests as an OpenMetrics exemplar."""

from __future__ import annotations

from prometheus_client.openmetrics.parser import text_string_to_metric_families

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.hooks import Observer
from proxy.observe.metrics import FastHistogram
from tests.conftest import ProxyFactory
from tests.helpers import Client, scrape

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class SampleSome(Observer):
    name = "sample-some"

    def on_request_head(self, ex: Exchange) -> None:
        if ex.path == "/echo/traced":
            ex.trace_id = TRACE
            ex.span_id = "00f067aa0ba902b7"
            ex.sampled = True


async def test_exemplar_in_openmetrics_only_for_sampled(make_proxy: ProxyFactory, upstream: str) -> None:
    app = await make_proxy(upstream, observers=(SampleSome(),))
    client = await Client.connect(app.proxy_address)
    assert (await client.request("GET", "/echo/plain")).status == 200
    assert (await client.request("GET", "/echo/traced")).status == 200
    ctype, text = await scrape(app.admin_address, accept="application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    exemplars = [
        s.exemplar
        for fam in text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
        if fam.name == "infermon_request_duration_seconds"
        for s in fam.samples
        if s.exemplar is not None
    ]
    assert len(exemplars) == 1
    assert exemplars[0].labels == {"trace_id": TRACE}
    # the classic text format has no exemplars
    _, plain = await scrape(app.admin_address)
    assert TRACE not in plain


def test_exposition_keeps_latest_exemplar_per_bucket() -> None:
    h = FastHistogram([0.1, 1.0])
    h.observe(0.05)
    h.observe_exemplar(0.5, "a" * 32)
    h.observe_exemplar(0.6, "b" * 32)
    rows = h.exposition()
    assert rows[0] == ("0.1", 1)
    assert rows[1][:2] == ("1.0", 3)
    assert len(rows[1]) == 3
    assert rows[1][2].labels == {"trace_id": "b" * 32}
    assert rows[2] == ("+Inf", 3)
