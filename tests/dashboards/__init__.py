"""The chart's Grafana dashboards: their source (`generate`), the PromQL helpers the tests
and the pictures share (`promql`), and the renderer of docs/images (`render`)."""
