"""The suite's figure: one panel per part that produced numbers (matplotlib, no display needed).

Each `_<part>(ax, data)` draws one benchmark's JSON (as written by its script's --json) into
one axis; `plot(parts, path)` lays out the panels and saves a PNG.
"""

from __future__ import annotations

import pathlib

ORDER = ("roofline", "throughput", "serve", "scaling", "memory", "transport")


def _roofline(ax, d: dict) -> None:
    rows = d["rows"]
    bars = [("shardline_ms", "Shardline"), ("hf_ms", "HF transformers"), ("floor_ms", "memory floor"),
            ("compute_floor_ms", "compute floor")]
    _grouped(ax, [f"B={r['batch']}" for r in rows], {label: [r[k] for r in rows] for k, label in bars})
    ax.set_yscale("log")
    ax.set_ylabel("ms per decode step (log)")
    ax.set_title(f"Roofline, single rank ({d['bandwidth_gbs']:.0f} GB/s, {d['matmul_gflops']:.0f} GFLOP/s)")


def _throughput(ax, d: dict) -> None:
    tps = d["tokens_per_s"]
    ax.bar(["Shardline\nLLM.generate", f"HF generate\nbatches of {d['hf_batch_size']}"],
           [tps["shardline"], tps["hf"]], color=["C0", "C1"])
    ax.set_ylabel("useful output tokens / s")
    ax.set_title(f"Offline throughput, {d['requests']} requests: {d['ratio']:.2f}x HF")


def _serve(ax, d: dict) -> None:
    runs = d.get("poisson") or []
    series = {f"{m.upper()} {s}": [_ms(p[m][s]) for p in runs] for m, s in
              (("ttft", "p50"), ("ttft", "p99"), ("tpot", "p50"), ("itl", "p99"))}
    _grouped(ax, [f"{p['rate']} req/s" for p in runs], series)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ratio = d.get("http_over_offline")
    ax.set_title("Serving, Poisson arrivals" + (f" (saturation: {ratio:.2f}x offline)" if ratio else ""))


def _scaling(ax, d: dict) -> None:
    labels, values = [], []
    for r in d["results"]:
        for batch, st in r["step_s"].items():
            for lay, s in st.items():
                if lay != "single":
                    labels.append(f"{r['model']}\n{lay} B={batch}")
                    values.append(st["single"] / s)
    ax.bar(range(len(values)), values, color="C2")
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=60, ha="right")
    ax.set_ylabel("single-rank step time / layout step time")
    ax.set_title("Layouts vs one rank (>1: faster)")


def _memory(ax, d: dict) -> None:
    labels, weights, kv, other = [], [], [], []
    for r in d["results"]:
        for lay in r["layouts"]:
            for k in lay["ranks"]:
                labels.append(f"{r['model']} {lay['layout']}\n({k['replica']},{k['pp_rank']},{k['tp_rank']})")
                weights.append(k["weight_bytes"] / 1e6)
                kv.append(k["kv_cache_bytes"] / 1e6)
                other.append(max(0.0, k["peak_rss"] / 1e6 - weights[-1] - kv[-1]))
    x = range(len(labels))
    ax.bar(x, weights, label="weights", color="C0")
    ax.bar(x, kv, bottom=weights, label="KV cache", color="C1")
    ax.bar(x, other, bottom=[a + b for a, b in zip(weights, kv)], label="rest of peak RSS", color="C7")
    ax.set_xticks(list(x), labels, fontsize=7, rotation=60, ha="right")
    ax.set_ylabel("MB per rank (dp, pp, tp)")
    ax.set_title("Memory per rank")
    ax.legend(fontsize=8)


def _transport(ax, d: dict) -> None:
    rows = d["results"]
    groups = [f"{r['workers']} w, B={r['batch']}" for r in rows]
    _grouped(ax, groups, {"actor calls": [r["actor_calls_ms"] for r in rows],
                          "compiled graph": [r["compiled_graph_ms"] for r in rows]})
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("ms per step message round trip (median)")
    ax.set_title("Executor -> worker transport")


def _grouped(ax, groups: list[str], series: dict[str, list[float]]) -> None:
    w = 0.8 / max(len(series), 1)
    for j, (label, values) in enumerate(series.items()):
        ax.bar([i + (j - (len(series) - 1) / 2) * w for i in range(len(groups))], values, w, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.legend(fontsize=8)


def _ms(v: float | None) -> float:
    return float("nan") if v is None else 1e3 * v


DRAW = {"roofline": _roofline, "throughput": _throughput, "serve": _serve, "scaling": _scaling, "memory": _memory,
        "transport": _transport}


def plot(parts: dict[str, dict | None], path: pathlib.Path) -> bool:
    """Save one figure with a panel per part that has numbers; False (and no file) if none has."""
    names = [n for n in ORDER if parts.get(n)]
    if not names:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        DRAW[name](ax, parts[name])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
