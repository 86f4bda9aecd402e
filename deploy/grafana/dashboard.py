"""The sockd dashboard, built with grafana-foundation-sdk (its typed builders write only what
Grafana's dashboard schema has): `python deploy/grafana/dashboard.py > deploy/grafana/sockd.json`.
tests/test_deploy_dashboard.py checks that sockd.json is what this writes, and runs every query
in it against a Prometheus that scraped a sockd under load."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.common import BigValueGraphMode, LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every panel's series, of the instances and listeners chosen above.
LISTENERS = 'instance=~"$instance", listener=~"$listener"'
INSTANCES = 'instance=~"$instance"'
LEGEND = "{{instance}} {{listener}}"
RATE = "[$__rate_interval]"


def by_label(metric: str, label: str) -> prometheus.Dataquery:
    """A counter's rate per instance, listener and `label`."""
    expr = f"sum by (instance, listener, {label}) (rate({metric}{{{LISTENERS}}}{RATE}))"
    return query(expr, f"{LEGEND} {{{{{label}}}}}")


def query(expr: str, legend: str = LEGEND, ref_id: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref_id).datasource(DATASOURCE)


def graph(title: str, unit: str, *queries: prometheus.Dataquery, description: str) -> timeseries.Panel:
    """A time series panel of `queries` (their refIds A, B, ... in order), a legend table below."""
    legend = common.VizLegendOptions().display_mode(LegendDisplayMode.TABLE).placement(LegendPlacement.BOTTOM)
    panel = timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
    for ref_id, target in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(target.ref_id(ref_id))
    return panel.legend(legend.show_legend(True)).height(8).span(12)


def variable(name: str, values_of: str) -> dashboard.QueryVariable:
    """A variable of the values its label takes in the series `values_of`: several, or all."""
    return (
        dashboard.QueryVariable(name)
        .id(name)
        .label(name)
        .datasource(DATASOURCE)
        .query(f"label_values({values_of}, {name})")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def build() -> dashboard.Dashboard:
    return (
        dashboard.Dashboard("sockd")
        .uid("sockd")
        .description("sockd's listeners, workers, reloads and certificates (README: Metrics).")
        .tags(["sockd"])
        .refresh("30s")
        .time("now-1h", "now")
        .with_variable(
            dashboard.DatasourceVariable("datasource").id("datasource").label("Prometheus").type("prometheus")
        )
        .with_variable(variable("instance", "sockd_build_info"))
        .with_variable(variable("listener", 'sockd_listener_info{instance=~"$instance"}'))
        .with_row(dashboard.Row("Traffic"))
        .with_panel(
            # The recording rules of deploy/prometheus/sockd-rules.yaml (a 1m rate).
            graph(
                "Requests/s",
                "reqps",
                query(f"listener:sockd_requests:rate1m{{{LISTENERS}}}"),
                description="Requests answered: each chunk on a stream, each datagram, each relayed connection.",
            )
        )
        .with_panel(
            graph(
                "Latency p50 / p99",
                "s",
                query(f"listener:sockd_request_duration_seconds:p50_1m{{{LISTENERS}}}", f"p50 {LEGEND}"),
                query(f"listener:sockd_request_duration_seconds:p99_1m{{{LISTENERS}}}", f"p99 {LEGEND}"),
                description="From reading a request to writing its reply; a relayed connection: its life.",
            )
        )
        .with_panel(
            graph(
                "Active connections",
                "short",
                query(f"sockd_connections_active{{{LISTENERS}}}"),
                description="Stream connections open now.",
            )
        )
        .with_panel(
            graph(
                "Errors by kind",
                "ops",
                by_label("sockd_errors_total", "kind"),
                description="reset, send, timeout, too_large, resources, upstream (a relay's upstream failed).",
            )
        )
        .with_panel(
            graph(
                "Rejections by reason",
                "ops",
                by_label("sockd_connections_rejected_total", "reason"),
                description="Connections closed at once and datagrams dropped by a limit or an access rule.",
            )
        )
        .with_panel(
            graph(
                "TLS handshakes by result",
                "ops",
                by_label("sockd_tls_handshakes_total", "result"),
                description="ok, failed, timeout, client_cert_rejected.",
            )
        )
        .with_row(dashboard.Row("Workers and config"))
        .with_panel(
            graph(
                "Listener up, worker restarts",
                "short",
                query(f"sockd_listener_up{{{LISTENERS}}}", f"up {LEGEND}"),
                query(f"increase(sockd_worker_restarts_total{{{LISTENERS}}}{RATE})", f"restarts {LEGEND}"),
                description="up: 1 while every worker serves (as /healthz says). Restarts: workers started again "
                "after an unexpected exit.",
            )
        )
        .with_panel(
            graph(
                "Worker generations",
                "short",
                query(f"sockd_worker_generations{{{LISTENERS}}}"),
                description="1, and one more for each a reload replaced that still serves connections.",
            )
        )
        .with_panel(
            graph(
                "Reloads, draining",
                "short",
                query(
                    f"sum by (instance, result) (increase(sockd_config_reloads_total{{{INSTANCES}}}{RATE}))",
                    "reloads {{instance}} {{result}}",
                ),
                query(f"sockd_config_last_reload_successful{{{INSTANCES}}}", "last reload ok {{instance}}"),
                query(f"sockd_draining{{{INSTANCES}}}", "draining {{instance}}"),
                description="Reloads (SIGHUP) by result; 0 for the last reload: the running config is older than "
                "the file; draining: 1 from a stop signal on.",
            )
        )
        .with_panel(
            stat.Panel()
            .title("Certificate expiry")
            .description("Time left on each certificate sockd presents (by listener and server name).")
            .datasource(DATASOURCE)
            .unit("dtdurations")
            .with_target(
                query(
                    f"sockd_tls_certificate_expiry_timestamp_seconds{{{LISTENERS}}} - time()",
                    "{{instance}} {{listener}} {{server_name}}",
                )
            )
            .graph_mode(BigValueGraphMode.NONE)
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .height(8)
            .span(12)
        )
    )


def numbered(built: model.Dashboard) -> model.Dashboard:
    """The dashboard with its panels (rows too) numbered 1, 2, ...: Grafana tells them apart by id."""
    for number, panel in enumerate(built.panels or [], start=1):
        panel.id_val = number
    return built


if __name__ == "__main__":
    print(JSONEncoder(sort_keys=True, indent=2).encode(numbered(build().build())))
