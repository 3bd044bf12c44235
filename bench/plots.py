"""PNG plots of the benchmarks' JSON results, written beside them (``x.json`` -> ``x.png``).

Each benchmark calls :func:`plot_results` after writing its JSON; ``python bench/plots.py
bench/results/*.json`` redraws saved results. Needs matplotlib (the ``bench`` extra); without it a note is
printed and nothing else changes.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, Callable


LABELS = {"gpu_worker": "gpu_worker", "batched": "gpu_worker (batching)", "one_at_a_time": "gpu_worker, batch 1",
          "serial": "serial openpi-style server", "serial_openpi_style": "serial openpi-style server"}


def _throughput(data: dict, plt) -> Any:
    """Throughput and latency against concurrency for every server measured (bench_gpu_worker,
    bench_lerobot), with the direct forward at batch N."""
    clients = sorted(data["throughput"], key=int)
    x = [int(c) for c in clients]
    servers = [k for k, v in data["throughput"][clients[0]].items() if isinstance(v, dict) and "requests_per_s" in v]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for server, marker in zip(servers, "osDv"):
        left.plot(x, [data["throughput"][c][server]["requests_per_s"] for c in clients], marker + "-",
                  label=LABELS.get(server, server))
        right.plot(x, [data["throughput"][c][server]["p50_ms"] for c in clients], marker + "-",
                   label=f"{LABELS.get(server, server)} p50")
        right.plot(x, [data["throughput"][c][server]["p99_ms"] for c in clients], marker + ":",
                   label=f"{LABELS.get(server, server)} p99")
    if all("direct_batched_rps" in data["throughput"][c] for c in clients):
        left.plot(x, [data["throughput"][c]["direct_batched_rps"] for c in clients], "^--",
                  label="direct forward at batch N")
    model = data.get("compute_model") or data.get("model") or "model"
    if isinstance(model, dict):
        model = (f"MLP {model.get('width')} x {model.get('depth')}" if "width" in model else
                 " ".join(str(model[k]) for k in ("type", "size") if k in model) or "model")
    left.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="requests / s",
             title=f"Throughput ({model}, {data.get('device', 'cpu')})")
    left.set_xticks(x, [str(v) for v in x])
    left.legend(fontsize=8)
    right.set(xscale="log", xlabel="concurrent clients", ylabel="ms", title="Latency percentiles")
    right.set_xticks(x, [str(v) for v in x])
    right.legend(fontsize=7)
    return fig


def _selfplay(data: dict, plt) -> Any:
    games = sorted(data["batched"], key=int)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(["one call per leaf"] + [f"batched, {g} game(s)" for g in games],
           [data["naive"]["simulations_per_s"]] + [data["batched"][g]["simulations_per_s"] for g in games])
    ax.set(ylabel="MCTS simulations / s", title=f"Self-play search ({data.get('network', '')}, "
                                                 f"{data.get('simulations')} simulations)")
    ax.tick_params(axis="x", labelsize=8)
    return fig


def _reload(data: dict, plt) -> Any:
    models = list(data["models"])
    phases = ("before", "during", "after")
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.25
    for k, phase in enumerate(phases):
        xs = [i + (k - 1) * width for i in range(len(models))]
        p50 = [data["models"][m]["phases"][phase]["p50_ms"] or 0 for m in models]
        p99 = [data["models"][m]["phases"][phase]["p99_ms"] or 0 for m in models]
        ax.bar(xs, p99, width, alpha=0.35, label=f"{phase} p99")
        ax.bar(xs, p50, width, label=f"{phase} p50")
    ax.set_xticks(range(len(models)), [f"{m}\n(reload {data['models'][m]['load_s'] + data['models'][m]['warmup_s']:.2f}s)"
                                       for m in models])
    ax.set(ylabel="request latency, ms", title=f"Latency across a hot reload ({data['clients']} clients)")
    ax.legend(fontsize=7, ncol=3)
    return fig


def _load(data: dict, plt) -> Any:
    phases = data["phases"]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [p["name"].split(" (")[0] for p in phases]
    ax.bar(names, [p["p50_ms"] for p in phases], label="p50")
    ax.bar(names, [p["p99_ms"] - p["p50_ms"] for p in phases], bottom=[p["p50_ms"] for p in phases], alpha=0.4,
           label="p99")
    for i, p in enumerate(phases):
        ax.text(i, p["p99_ms"], f"{p['requests_per_s']:.0f} req/s", ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="ms", title="Sustained load")
    ax.legend()
    return fig


def _score(data: dict, plt) -> Any:
    fig, ax = plt.subplots(figsize=(6, 4))
    for servers in sorted({p["model_servers"] for p in data["points"]}):
        points = [p for p in data["points"] if p["model_servers"] == servers]
        ax.plot([p["max_workers"] for p in points], [p["tasks_per_s"] for p in points], "o-",
                label=f"{servers} model server(s)")
    ax.set(xlabel="max_workers", ylabel="tasks / s", title=f"/score throughput ({data['tasks_per_request']} tasks)")
    ax.legend()
    return fig


PLOTTERS: dict[str, Callable] = {"throughput": _throughput, "batched": _selfplay, "models": _reload,
                                 "phases": _load, "points": _score}


def plot_results(json_path: str | pathlib.Path) -> pathlib.Path | None:
    """Draw ``json_path``'s figures into the PNG beside it; None when there is nothing to draw or no
    matplotlib."""
    path = pathlib.Path(json_path)
    data = json.loads(path.read_text())
    plotter = next((fn for key, fn in PLOTTERS.items() if key in data), None)
    if plotter is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot drawn")
        return None
    try:
        fig = plotter(data, plt)
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # a shape this module does not know: no plot
        print(f"no plot drawn for {path.name}: {type(exc).__name__}: {exc}")
        plt.close("all")
        return None
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    for name in sys.argv[1:]:
        plot_results(name)
