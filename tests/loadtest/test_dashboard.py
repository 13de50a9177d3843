"""The Grafana dashboard (loadtest/grafana/loraplex-dashboard.json) queries only metrics the server exposes.

The names are checked against the sample names of a live /metrics (the `_total`, `_bucket`, `_sum` and
`_count` series Prometheus stores), after one completion on the base and one on an adapter, so that the
labelled histograms and counters have samples."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import create_app
from tests.loadtest import dashboard
from tests.loadtest.tiny_app import ADAPTER, SERVED_NAME, completion, tiny_config
from tests.server.conftest import make_causal_adapter


@pytest.fixture(scope="module")
def exposed_series(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> set[str]:
    root = tmp_path_factory.mktemp("dashboard")
    adapter = make_causal_adapter(tiny_llama_dir, root / ADAPTER, 1, 4, ["q_proj", "v_proj"])
    with TestClient(create_app(tiny_config(tiny_llama_dir, adapter, root / "state"))) as client:
        for model in (SERVED_NAME, ADAPTER):
            assert client.post("/v1/completions", json=completion(model)).status_code == 200
        text = client.get("/metrics").text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_queried_metric_is_exposed(exposed_series):
    board = dashboard.load()
    queried = dashboard.variable_metric_names(board)
    for title, expr in dashboard.expressions(board):
        names = dashboard.metric_names(expr)
        assert names, f"panel {title!r}: no metric found in {expr!r}"
        missing = names - exposed_series
        assert not missing, f"panel {title!r} queries {sorted(missing)}, which /metrics does not expose"
        queried |= names
    assert queried - exposed_series == set()


def test_the_dashboard_covers_the_serving_metrics():
    """The panels the dashboard promises: latency percentiles, load, KV cache, adapter tiers, traffic."""
    board = dashboard.load()
    queried = set().union(*(dashboard.metric_names(expr) for _, expr in dashboard.expressions(board)))
    for name in ("loraplex_time_to_first_token_seconds_bucket", "loraplex_inter_token_latency_seconds_bucket",
                 "loraplex_e2e_request_latency_seconds_bucket", "loraplex_num_requests_running",
                 "loraplex_num_requests_waiting", "loraplex_kv_cache_usage_perc",
                 "loraplex_adapter_cache_hits_total", "loraplex_adapter_cache_misses_total",
                 "loraplex_adapter_cache_evictions_total", "loraplex_adapters_resident",
                 "loraplex_lora_slot_loads_total", "loraplex_requests_total"):
        assert name in queried, name


def test_panels_use_the_datasource_variable_and_unique_ids():
    board = dashboard.load()
    assert [v["name"] for v in board["templating"]["list"] if v["type"] == "datasource"] == ["datasource"]
    ids = [panel["id"] for panel in dashboard.panels(board)]
    assert len(ids) == len(set(ids))
    for panel in dashboard.panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


@pytest.mark.parametrize(("expr", "names"), [
    ('histogram_quantile(0.95, sum by (le) (rate(a_bucket{adapter=~".*"}[1m])))', {"a_bucket"}),
    ('sum by (status) (rate(b_total{route="/v1/x"}[5m])) / ignoring (status) c', {"b_total", "c"}),
    ("d offset 1h30m and on (job) e", {"d", "e"}),
    ('f{label="by (x) g"}', {"f"}),
])
def test_metric_names_reads_promql(expr, names):
    assert dashboard.metric_names(expr) == names
