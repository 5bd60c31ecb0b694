"""The Grafana dashboard (deploy/grafana/clipserve.json) asks only for what the server exports."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

import clipserve
from clipserve_server.models.fake_model import FakeModel
from clipserve_server.utils.config import ServerConfig

from ..conftest import ROOT, free_port
from ..helpers import InProcessServer, make_image

DASHBOARD = ROOT / "deploy" / "grafana" / "clipserve.json"
# Labels Prometheus adds to every series it scrapes (the pod's address, the scrape job).
_TARGET_LABELS = {"instance", "job"}
_FUNCTIONS_AND_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def _queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [
        (f"panel {p['title']!r} target {t['refId']}", t["expr"])
        for p in _panels(dashboard["panels"])
        for t in p.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            found.append(
                (f"variable ${variable['name']}", re.sub(r"^label_values\((.*),\s*(\w+)\)$", r"\1 by (\2)", query))
            )
    return found


def metrics_and_labels(promql: str) -> tuple[set[str], set[str]]:
    """The metric names a PromQL expression reads, and every label it matches on or groups by.

    Enough PromQL for a dashboard: selectors, ``by``/``without``/``on``/``ignoring`` lists,
    functions, ranges and Grafana's ``$variables``.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)  # label values may hold anything
    labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", " ".join(re.findall(r"\{([^}]*)\}", text))))
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels |= {name.strip() for name in group.split(",") if name.strip()}
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = {m.group(1) for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text)}
    return names - _FUNCTIONS_AND_KEYWORDS, labels


def test_the_promql_reader_finds_metrics_and_labels():
    """The reader the dashboard test relies on: metrics, not functions, keywords or variables."""
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"$model", '
        'code!="x{y}"}[$__rate_interval]))) / on (model) b'
    )
    assert metrics_and_labels(expr) == ({"a_bucket", "b"}, {"le", "model", "code"})


@pytest.fixture(scope="module")
def exported(image_host, tmp_path_factory) -> Iterator[dict[str, set[str]]]:
    """What a real server's /metrics endpoint exports once it has served traffic: each series
    name with its labels. Labelled series appear with their first sample, so the traffic
    touches each: an upload, a fetched image, a failed fetch, cache hits."""
    port = free_port()
    server = InProcessServer(ServerConfig(allow_private_networks=True, metrics_port=port), FakeModel())
    path = tmp_path_factory.mktemp("dashboard") / "x.png"
    path.write_bytes(make_image(seed=5))
    with clipserve.CLIP(server.address) as clip:
        clip.score_batch(
            [
                ("a", str(path)),
                ("a", str(path)),
                ("b", image_host.url("status/404")),
                ("c", image_host.url("img/photo1.png")),
            ]
        )
        clip.embed_texts(["a", "a"])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    server.stop()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    yield series


def test_the_dashboard_is_grafana_json_with_panels_and_queries():
    """It loads as a Grafana dashboard: a uid, a schema version, unique panel ids, queries."""
    dashboard = _dashboard()
    assert dashboard["uid"] == "clipserve" and dashboard["schemaVersion"] >= 36
    assert len(_queries(dashboard)) >= 10
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("where", "promql"), [pytest.param(where, promql, id=where) for where, promql in _queries(_dashboard())]
)
def test_every_dashboard_query_names_metrics_and_labels_the_server_exports(exported, where, promql):
    """Each metric a panel (or a variable) reads is one a real server exports, and each label
    it matches or groups on is one that metric has (or a label Prometheus adds: instance, job)."""
    names, labels = metrics_and_labels(promql)
    assert names, f"{where}: no metric in {promql}"
    for name in sorted(names):
        assert name in exported, (
            f"{where}: the server exports no {name} (it has "
            f"{', '.join(sorted(n for n in exported if n.startswith('clipserve')))})"
        )
        missing = (
            labels - exported[name] - _TARGET_LABELS - {"le"}
            if name.endswith("_bucket")
            else labels - exported[name] - _TARGET_LABELS
        )
        assert not missing, (
            f"{where}: {name} has no label {', '.join(sorted(missing))} (it has {', '.join(sorted(exported[name]))})"
        )


def test_every_panel_is_per_model_and_instance_where_the_metric_is(exported):
    """Every panel follows the $instance variable; one on a metric with a ``model`` label
    follows $model too and keeps models apart (never sums them together)."""
    for panel in _panels(_dashboard()["panels"]):
        for target in panel.get("targets", []):
            expr, where = target["expr"], f"panel {panel['title']!r} target {target['refId']}"
            assert 'instance=~"$instance"' in expr, f"{where}: not filtered by $instance"
            if any("model" in exported.get(name, ()) for name in metrics_and_labels(expr)[0]):
                assert 'model=~"$model"' in expr, f"{where}: not filtered by $model"
                for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
                    assert "model" in group, f"{where}: sums models together (by {group})"

