"""PNG plots of ``kvpipe bench`` results, drawn from the JSON each suite writes.

matplotlib is optional (``pip install 'kvpipe[plot]'``); it is imported only here, lazily,
with the non-interactive Agg backend. Without it :func:`write_plot` returns False and the
caller prints :data:`MISSING`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MISSING = "matplotlib not installed: pip install 'kvpipe[plot]' for PNG plots; JSON written"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GROUP_LABELS = {
    "batching": "article's model (two 1000x1000 heads)",
    "batching-mlp": "small MLP (32-64-8)",
    "onnx": "digits MLP, same weights: ONNX (onnxruntime) vs numpy",
}


def available() -> bool:
    """Whether matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(suite: str, doc: Mapping[str, Any], path: Path) -> bool:
    """Draw the plot of ``suite`` from its JSON ``doc`` into ``path``; False without matplotlib."""
    if not available():
        return False
    plt = _pyplot()
    results: Mapping[str, Any] = doc.get("results", {})
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        if suite == "e2e":
            _e2e(ax, results["e2e"])
        elif suite == "cache":
            _cache(ax, results["cache"]["rows"])
        elif suite == "prefix":
            _prefix(ax, results["prefix"]["ttft"])
        else:
            _comparisons(ax, suite, results)
        info = doc.get("machine", {})
        if info:
            fig.text(
                0.99,
                0.01,
                f"nproc {info.get('nproc')}, python {info.get('python')}",
                ha="right",
                va="bottom",
                fontsize=7,
                color="gray",
            )
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return True


def _e2e(ax: Any, e2e: Mapping[str, Any]) -> None:
    """Latency (p50 and p99) against achieved throughput, one line pair per side."""
    styles = {"worker": "tab:blue", "echo": "tab:orange"}
    for side, color in styles.items():
        points = [
            p
            for p in e2e["points"]
            if p["side"] == side and not p["half_of_max"] and p["passed"] and p["latency_ms"]
        ]
        points.sort(key=lambda p: p["rate"])
        x = [p["throughput"] for p in points]
        for q, style in (("p50", "--"), ("p99", "-")):
            y = [p["latency_ms"][q] for p in points]
            ax.plot(x, y, style, marker="o", color=color, label=f"{side} {q}")
    ax.set_yscale("log")
    ax.set_xlabel("achieved throughput (answers/s)")
    ax.set_ylabel("end-to-end latency (ms, log)")
    ratio, goal = e2e.get("latency_ratio"), e2e.get("latency_goal")
    half = e2e.get("half_rate")
    title = "open loop: worker (small MLP, warm cache) vs bare echo"
    if ratio is not None and half is not None:
        title += (
            f"\np99 ratio at {half:.0f}/s (half the worker max): {ratio:.2f}x, goal <= {goal:g}x"
        )
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _comparisons(ax: Any, suite: str, results: Mapping[str, Any]) -> None:
    """Grouped bars: one group per comparison, one bar per side, the ratio over each group."""
    groups = [(name, cmp) for name, cmp in results.items() if "sides" in cmp]
    width = 0.38
    unit = ""
    ticks: list[str] = []
    for g, (name, cmp) in enumerate(groups):
        sides: Sequence[Mapping[str, Any]] = cmp["sides"]
        for s, side in enumerate(sides):
            rate = side["rate"] or 0.0
            x = g + (s - (len(sides) - 1) / 2) * width
            bar = ax.bar(x, rate, width * 0.95, color=f"C{s}")
            label = side["label"] if side["rate"] is not None else f"{side['label']} (FAIL)"
            ax.bar_label(bar, labels=[f"{label}\n{rate:,.0f}"], fontsize=8)
            unit = side["unit"]
        ratio = cmp.get("ratio")
        verdict = "met" if cmp.get("goal_met") else "NOT met"
        caption = "n/a" if ratio is None else f"{ratio:.2f}x (goal >= {cmp['goal']:g}x: {verdict})"
        label = GROUP_LABELS.get(name, name)
        ticks.append(f"{label}\n{cmp.get('ratio_of', '')}: {caption}")
    ax.set_xticks(range(len(groups)), ticks, fontsize=8)
    ax.set_ylabel(unit or "rate")
    ax.margins(y=0.2)
    ax.set_title(f"kvpipe bench {suite}", fontsize=10)


def _prefix(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Time to first token per shared-prefix length: cold, warm from Redis, warm local."""
    sides = (("cold", "cold (computed)"), ("redis", "warm, from Redis"), ("local", "warm, local"))
    width = 0.8 / len(sides)
    for i, (key, label) in enumerate(sides):
        xs = [g + (i - (len(sides) - 1) / 2) * width for g in range(len(rows))]
        ys = [row["server_ttft_ms"][key] or 0.0 for row in rows]
        bars = ax.bar(xs, ys, width * 0.95, label=label, color=f"C{i}")
        ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=7)
    ax.set_xticks(
        range(len(rows)),
        [
            f"{r['prefix_tokens']:,} tokens\nwarm/cold {r['warm_redis_over_cold']:.2f}x"
            for r in rows
        ],
        fontsize=8,
    )
    ax.set_ylabel("time to first token, ms (worker)")
    ax.set_yscale("log")
    ax.set_title("kvpipe bench prefix: gen-small, shared prefix reused through Redis", fontsize=10)
    ax.legend(fontsize=8)


def _cache(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Hit rate per policy per trace, Belady's optimum beside them."""
    names: list[str] = []
    for row in rows:
        names.extend(n for n in row["hit_rate"] if n != "opt" and n not in names)
    names.append("opt")
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(rows))]
        ys = [row["hit_rate"].get(name) or 0.0 for row in rows]
        label = "Belady (OPT)" if name == "opt" else name.upper()
        ax.bar(xs, ys, width * 0.95, label=label, color="black" if name == "opt" else f"C{i}")
    ax.set_xticks(range(len(rows)), [str(r["trace"]) for r in rows], fontsize=7, rotation=12)
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1)
    ax.set_title("cache simulation: eviction policies beside Belady's optimum", fontsize=10)
    ax.legend(fontsize=8)
