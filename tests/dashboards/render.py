"""`make dashboards`: pictures of the two dashboards from a demo's real data,
docs/images/dashboard-coordinator.png and dashboard-participant.png.

No Grafana server is involved: each panel is drawn with matplotlib where its `gridPos`
puts it, from the same PromQL Grafana would send (range queries at the panel step;
a stat panel's last value, or its instant query), evaluated by a real Prometheus over
rounds of the single-cluster example on the test cluster (tests.dashboards.observed).

    python -m tests.dashboards.render [--rounds 4] [--save-data results.json]
    python -m tests.dashboards.render --from-data results.json   # redraw only

Needs the `docs` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.dashboards import promql
from tests.dashboards.generate import DASHBOARDS, REPO

IMAGES = REPO / "docs" / "images"
NAMES = tuple(DASHBOARDS)
WIDTH_PX = 1600
UNIT_PX = 30  # Grafana's height of one gridPos row
HEADER_PX = 56
# Grafana's classic palette
COLORS = ("#7EB26D", "#EAB839", "#6ED0E0", "#EF843C", "#E24D42", "#1F78C1", "#BA43A9",
          "#705DA0", "#508642", "#CCA300", "#447EBC", "#C15C17")  # fmt: skip

Results = dict[str, list[dict[str, Any]]]  # Target.title -> Prometheus result


# -- the data ----------------------------------------------------------------------------


def collect(rounds: int, work: Path) -> dict[str, Any]:
    """Run the demo and evaluate every panel query over it."""
    from tests.dashboards.observed import observed_rounds
    from tests.kube.cluster import KubeCluster, ensure_binaries
    from tests.s3servers import start_minio

    cluster = KubeCluster(ensure_binaries(sys.stderr), work / "cluster")
    cluster.start()
    minio = start_minio(work / "minio")
    try:
        # The operator's metrics over OTLP only, as a party with a collector has them.
        with observed_rounds(
            cluster, minio, work, rounds=rounds, bucket="pictures", scrape=False
        ) as obs:
            step = max(2.0, math.ceil((obs.end - obs.start) / 160))
            results: dict[str, Results] = {}
            for name in NAMES:
                board = promql.load(name)
                results[name] = {t.title: obs.evaluate(t, step) for t in promql.targets(board)}
            return {
                "start": obs.start, "end": obs.end, "step": step, "rounds": rounds,
                "variables": obs.variables, "results": results,
            }  # fmt: skip
    finally:
        minio.stop()
        cluster.stop()


# -- formatting --------------------------------------------------------------------------


def _scaled(value: float, base: float, units: Sequence[str]) -> str:
    i = 0
    while abs(value) >= base and i < len(units) - 1:
        value /= base
        i += 1
    return f"{value:.3g} {units[i]}".strip()


def format_value(value: float, unit: str, decimals: int | None = None) -> str:
    """A value as Grafana shows it in `unit`."""
    if unit == "bytes":
        return _scaled(value, 1024, ("B", "KiB", "MiB", "GiB", "TiB"))
    if unit == "Bps":
        return _scaled(value, 1000, ("B/s", "kB/s", "MB/s", "GB/s"))
    if unit == "s":
        if value == 0:
            return "0 s"
        if abs(value) < 1:
            return f"{value * 1000:.3g} ms"
        if abs(value) < 60:
            return f"{value:.3g} s"
        return f"{value / 60:.3g} min"
    if decimals is not None:
        return f"{value:.{decimals}f}"
    if unit == "short":
        return _scaled(value, 1000, ("", "K", "Mil", "Bil"))
    return f"{value:.4g}"


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: `{{label}}` replaced by the series' label value."""
    if fmt in ("", "__auto"):
        shown = {k: v for k, v in labels.items() if k != "__name__"}
        return ", ".join(f"{k}={v}" for k, v in shown.items()) or "value"
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt)
    return " ".join(text.split()) or fmt


def _points(series: dict[str, Any]) -> list[tuple[float, float]]:
    raw = series.get("values") or [series["value"]]
    return [(float(t), float(v)) for t, v in raw]


# -- drawing -----------------------------------------------------------------------------


def render(name: str, data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    board = promql.load(name)
    results: Results = data["results"][name]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
    height_px = HEADER_PX + rows * UNIT_PX + 10
    dpi = 100
    fig = plt.figure(figsize=(WIDTH_PX / dpi, height_px / dpi), dpi=dpi, facecolor="#f4f5f5")
    col_w = (WIDTH_PX - 16) / 24

    def box(g: dict[str, int]) -> tuple[float, float, float, float]:
        """gridPos -> figure fraction (left, bottom, width, height), with a gutter."""
        left = (8 + g["x"] * col_w + 4) / WIDTH_PX
        top = (HEADER_PX + g["y"] * UNIT_PX + 4) / height_px
        w = (g["w"] * col_w - 8) / WIDTH_PX
        h = (g["h"] * UNIT_PX - 8) / height_px
        return left, 1 - top - h, w, h

    variables = "   ".join(f"{k} = {v}" for k, v in data["variables"].items() if f"${k}" in
                           json.dumps(board))  # fmt: skip
    start = datetime.fromtimestamp(data["start"]).strftime("%Y-%m-%d %H:%M")
    end = datetime.fromtimestamp(data["end"]).strftime("%H:%M")
    fig.text(8 / WIDTH_PX, 1 - 22 / height_px, board["title"], fontsize=15, weight="bold",
             va="center", color="#22252b")  # fmt: skip
    fig.text(8 / WIDTH_PX, 1 - 44 / height_px,
             f"{variables}     {start} to {end}: rounds 0 to {data['rounds'] - 1}",
             fontsize=9.5, va="center", color="#555a63")  # fmt: skip

    for panel in board["panels"]:
        g = panel["gridPos"]
        left, bottom, w, h = box(g)
        if panel["type"] == "row":
            fig.text(left, bottom + h / 2, panel["title"], fontsize=11.5, weight="bold",
                     va="center", color="#22252b")  # fmt: skip
            continue
        frame = fig.add_axes((left, bottom, w, h))
        frame.set_xticks([])
        frame.set_yticks([])
        frame.set_facecolor("white")
        for spine in frame.spines.values():
            spine.set_color("#d8d9dc")
        frame.text(0.012, 1 - 15 / (h * height_px), panel["title"], transform=frame.transAxes,
                   fontsize=10, weight="bold", va="center", color="#22252b")  # fmt: skip
        unit = panel["fieldConfig"]["defaults"]["unit"]
        decimals = panel["fieldConfig"]["defaults"].get("decimals")
        series = [
            (legend(t["legendFormat"], s["metric"]), _points(s))
            for t in panel["targets"]
            for s in results[f"{board['uid']} / {panel['title']} / {t['refId']}"]
        ]
        series = [(label, [(x, y) for x, y in pts if math.isfinite(y)]) for label, pts in series]
        series = sorted(((lb, p) for lb, p in series if p), key=lambda s: s[0])
        if not series:
            frame.text(0.5, 0.45, "No data", transform=frame.transAxes, ha="center",
                       fontsize=11, color="#8e8e8e")  # fmt: skip
            continue
        if panel["type"] == "stat":
            n = len(series)
            for i, (label, pts) in enumerate(series):
                x = (i + 0.5) / n
                frame.text(x, 0.42, format_value(pts[-1][1], unit, decimals),
                           transform=frame.transAxes, ha="center", va="center",
                           fontsize=26 if n < 3 else 20, weight="bold",
                           color=COLORS[5])  # fmt: skip
                frame.text(x, 0.14, label, transform=frame.transAxes, ha="center",
                           fontsize=9, color="#555a63")  # fmt: skip
            continue
        _timeseries(fig, panel, (left, bottom, w, h), height_px, series, unit, decimals, data)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    plt.close(fig)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", optimize=True)


def _timeseries(
    fig: Any,
    panel: dict[str, Any],
    rect: tuple[float, float, float, float],
    height_px: float,
    series: list[tuple[str, list[tuple[float, float]]]],
    unit: str,
    decimals: int | None,
    data: dict[str, Any],
) -> None:
    """A time series panel: lines with points, bars or stacked areas, a legend below."""
    import matplotlib.dates
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    mdates: Any = matplotlib.dates  # its functions are not annotated

    left, bottom, w, h = rect
    ncol = max(1, int(w * WIDTH_PX // 170))
    legend_px = 12 + 15 * math.ceil(len(series) / ncol)
    pad_top, pad_bottom = 30 / height_px, (22 + legend_px) / height_px
    ax = fig.add_axes((left + 62 / WIDTH_PX, bottom + pad_bottom,
                       w - 74 / WIDTH_PX, h - pad_top - pad_bottom))  # fmt: skip
    custom = panel["fieldConfig"]["defaults"]["custom"]
    step = float(data["step"])
    colors = {label: COLORS[i % len(COLORS)] for i, (label, _) in enumerate(series)}

    def when(t: float) -> datetime:
        return datetime.fromtimestamp(t)

    top_value = 0.0
    if custom["stacking"]["mode"] == "normal":
        stamps = sorted({x for _, pts in series for x, _ in pts})
        stack = [0.0] * len(stamps)
        for label, pts in series:
            by_time = dict(pts)
            top = [s + by_time.get(x, 0.0) for s, x in zip(stack, stamps, strict=True)]
            ax.fill_between([when(x) for x in stamps], stack, top, color=colors[label],
                            alpha=0.6, lw=0, step="post", label=label)  # fmt: skip
            stack = top
        top_value = max(stack, default=0.0)
    elif custom["drawStyle"] == "bars":
        width = step / 86400 * 0.9 / len(series)  # in days, matplotlib's date unit
        for i, (label, pts) in enumerate(series):
            shown = [(x, y) for x, y in pts if y != 0] or [(data["start"], 0.0)]
            offset = (i - (len(series) - 1) / 2) * width
            xs = [mdates.date2num(when(x)) + offset for x, _ in shown]
            ax.bar(xs, [y for _, y in shown], width=width, color=colors[label], label=label)
            top_value = max(top_value, *(y for _, y in shown))
    else:
        fill = custom["fillOpacity"] / 100
        for label, pts in series:
            xs, ys = [when(x) for x, _ in pts], [y for _, y in pts]
            ax.plot(xs, ys, color=colors[label], lw=1.8, label=label,
                    marker="o" if custom["showPoints"] == "always" else None, ms=4)  # fmt: skip
            if fill:
                ax.fill_between(xs, ys, color=colors[label], alpha=fill * 0.6, lw=0)
            top_value = max(top_value, *ys)
    ax.set_xlim(when(data["start"]), when(data["end"]))
    ax.set_ylim(0, top_value * 1.15 if top_value > 0 else 1)
    span = data["end"] - data["start"]
    tick = next((t for t in (15, 30, 60, 120, 300, 600, 1800, 3600) if span / t <= 7), 7200)
    if tick < 60:
        ax.xaxis.set_major_locator(mdates.SecondLocator(interval=tick))
    else:
        ax.xaxis.set_major_locator(mdates.MinuteLocator(interval=tick // 60))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S" if span < 900 else "%H:%M"))
    if decimals == 0:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
    axis_decimals = 0 if decimals == 0 else None
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v, unit, axis_decimals)))
    ax.tick_params(labelsize=8, colors="#555a63", length=0)
    ax.grid(True, color="#eeeeee", lw=0.8)
    for spine in ax.spines.values():
        spine.set_visible(False)
    below = -22 / (ax.get_position().height * height_px)
    ax.legend(loc="upper left", bbox_to_anchor=(0, below), ncol=ncol, fontsize=8,
              frameon=False, handlelength=1.2, borderaxespad=0)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--from-data", type=Path, help="redraw from saved query results")
    parser.add_argument("--save-data", type=Path, help="also save the query results here")
    parser.add_argument("--out", type=Path, default=IMAGES)
    args = parser.parse_args(argv)
    if args.from_data:
        data = json.loads(args.from_data.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="tapestry-dashboards-") as work:
            data = collect(args.rounds, Path(work))
        if args.save_data:
            args.save_data.write_text(json.dumps(data))
    for name in NAMES:
        out = args.out / f"dashboard-{name}.png"
        render(name, data, out)
        print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
