"""Render a few panels of the Grafana dashboard (emserve.json) from a Prometheus into one PNG.

For the README's picture (docs/img/dashboard.png) without a Grafana: each panel's PromQL is expanded the
way Grafana would (:func:`expand`), read with ``/api/v1/query_range`` and drawn with matplotlib, with the
panel's title, unit and legend.

    python deploy/grafana/render_png.py --prometheus http://127.0.0.1:9090 --minutes 5 \\
        --out docs/img/dashboard.png

tests/deploy/test_prometheus.py uses :func:`expand` for its acceptance and calls :func:`render` when
``EMSERVE_RENDER_DASHBOARD=PATH`` is set.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).with_name("emserve.json")
DEFAULT_PANELS = ("Ingest throughput", "Question TTFT", "Ingest step time by phase", "Retrieval latency",
                  "Disk by part", "vLLM tokens")


def expand(expr: str, *, rate_interval: str = "15s", interval: str = "5s", range_: str = "5m",
           variables: dict[str, str] | None = None) -> str:
    """``expr`` with Grafana's variables replaced: ``$__rate_interval``, ``$__interval``, ``$__range``
    by the given durations, and template variables (``$job``, ``${instance}``, ...) by ``variables``
    (default: every other variable becomes the regex ``.*``, Grafana's "All" of this dashboard)."""
    builtins = {"__rate_interval": rate_interval, "__interval": interval, "__range": range_}
    variables = variables or {}

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in builtins:
            return builtins[name]
        return variables.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel with queries (rows' children included, rows themselves not)."""
    out: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        if p.get("type") == "row":
            out += [c for c in p.get("panels", []) if c.get("targets")]
        elif p.get("targets"):
            out.append(p)
    return out


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    url = prometheus.rstrip("/") + "/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return list(body["data"]["result"])


def _legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt:
        return ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def _formatter(unit: str) -> tuple[Any, str]:
    """A matplotlib tick formatter and an axis label for a Grafana unit."""
    from matplotlib.ticker import FuncFormatter

    def scaled(base: float, names: tuple[str, ...], suffix: str = "") -> Any:
        def f(v: float, _pos: int = 0) -> str:
            i = 0
            while abs(v) >= base and i < len(names) - 1:
                v, i = v / base, i + 1
            return f"{v:.3g} {names[i]}{suffix}".strip()
        return FuncFormatter(f)

    if unit == "s":
        def sec(v: float, _pos: int = 0) -> str:
            if v == 0:
                return "0"
            if abs(v) < 1e-3:
                return f"{v * 1e6:.3g} µs"
            return f"{v * 1e3:.3g} ms" if abs(v) < 1 else f"{v:.3g} s"
        return FuncFormatter(sec), "seconds"
    if unit == "bytes":
        return scaled(1024, ("B", "KiB", "MiB", "GiB", "TiB")), "bytes"
    if unit == "Bps":
        return scaled(1024, ("B", "KiB", "MiB", "GiB"), "/s"), "bytes/s"
    if unit == "percentunit":
        return FuncFormatter(lambda v, _p=0: f"{v * 100:.3g}%"), "percent"
    if unit.startswith("suffix:"):
        suffix = unit.split(":", 1)[1].strip()
        return scaled(1000, ("", "k", "M", "G")), suffix
    return scaled(1000, ("", "k", "M", "G")), {"ops": "ops/s", "reqps": "requests/s"}.get(unit, "")


def render(prometheus: str, out: str | Path, *, start: float, end: float, step: float = 2.0,
           rate_interval: str = "15s", titles: tuple[str, ...] = DEFAULT_PANELS,
           dashboard: Path = DASHBOARD, size_px: tuple[int, int] = (1200, 800)) -> Path:
    """Draw the panels named ``titles`` over ``[start, end]`` into the PNG ``out``; returns its path."""
    import datetime as dt

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    board = json.loads(Path(dashboard).read_text())
    by_title = {p["title"]: p for p in panels(board)}
    missing = [t for t in titles if t not in by_title]
    if missing:
        raise KeyError(f"no panel titled {missing} in {dashboard}")
    cols = 3 if len(titles) > 4 else 2
    rows = math.ceil(len(titles) / cols)
    dpi = 100
    fig, axes = plt.subplots(rows, cols, figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi, squeeze=False)
    plt.rcParams.update({"font.size": 8})
    for ax in axes.flat[len(titles):]:
        ax.set_visible(False)
    every = next(s for s in (10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
                 if (end - start) / s <= 5)  # at most ~5 time ticks a panel
    ticks = [dt.datetime.fromtimestamp(t) for t in range(math.ceil(start / every) * every, int(end) + 1, every)]
    for ax, title in zip(axes.flat, titles, strict=False):
        panel = by_title[title]
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        unit = defaults.get("unit", "short")
        stacked = defaults.get("custom", {}).get("stacking", {}).get("mode") == "normal"
        right = {o["matcher"]["options"] for o in panel.get("fieldConfig", {}).get("overrides", [])
                 if o.get("matcher", {}).get("id") == "byFrameRefID"}
        ax2 = None
        stack: list[tuple[str, list[Any], list[float]]] = []
        for target in panel["targets"]:
            expr = expand(target["expr"], rate_interval=rate_interval, interval=f"{step:g}s")
            for series in query_range(prometheus, expr, start, end, step):
                xs = [dt.datetime.fromtimestamp(float(t)) for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                label = _legend(target.get("legendFormat", ""), series["metric"])
                if target["refId"] in right:
                    if ax2 is None:
                        ax2 = ax.twinx()
                    ax2.plot(xs, ys, lw=1.2, ls="--", label=label)
                elif stacked:
                    stack.append((label, xs, ys))
                else:
                    ax.plot(xs, ys, lw=1.2, label=label)
        if stack:
            stack.sort(key=lambda s: -sum(v for v in s[2] if math.isfinite(v)))
            grid = sorted({x for _, xs, _ in stack for x in xs})
            layers = []
            for _, xs, ys in stack:
                at = dict(zip(xs, ys, strict=True))
                layers.append([at.get(x, 0.0) if math.isfinite(at.get(x, 0.0)) else 0.0 for x in grid])
            ax.stackplot(grid, *layers, labels=[s[0] for s in stack], alpha=0.75, lw=0.5)
        fmt, axis_label = _formatter(unit)
        ax.yaxis.set_major_formatter(fmt)
        ax.set_ylabel(axis_label, fontsize=8)
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10, fontweight="bold", loc="left")
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M" if end - start > 900 else "%H:%M:%S"))
        ax.set_xlim(dt.datetime.fromtimestamp(start), dt.datetime.fromtimestamp(end))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if ax2 is not None:
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
            ax2.set_ylim(bottom=0)
            ax2.tick_params(labelsize=7)
        if handles:
            ax.legend(handles[:10], labels[:10], fontsize=6, loc="upper left", ncol=2 if len(handles) > 4 else 1,
                      framealpha=0.7)
    stamp = dt.datetime.fromtimestamp(end).strftime("%Y-%m-%d %H:%M")
    fig.suptitle(f"emserve — Grafana dashboard panels (deploy/grafana/emserve.json), Prometheus, {stamp}",
                 fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--dashboard", type=Path, default=DASHBOARD)
    ap.add_argument("--minutes", type=float, default=10.0, help="the last N minutes (unless --start)")
    ap.add_argument("--start", type=float, help="unix time")
    ap.add_argument("--end", type=float, help="unix time (default now)")
    ap.add_argument("--step", type=float, default=2.0, help="seconds between points")
    ap.add_argument("--rate-interval", default="15s", help="what $__rate_interval stands for")
    ap.add_argument("--panels", help=f"comma-separated panel titles (default: {', '.join(DEFAULT_PANELS)})")
    ap.add_argument("--out", default="docs/img/dashboard.png")
    a = ap.parse_args(argv)
    end = a.end or time.time()
    start = a.start or end - a.minutes * 60
    titles = tuple(t.strip() for t in a.panels.split(",")) if a.panels else DEFAULT_PANELS
    path = render(a.prometheus, a.out, start=start, end=end, step=a.step, rate_interval=a.rate_interval,
                  titles=titles, dashboard=a.dashboard)
    print(f"{path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
