"""The benchmark's report: ratios to in-process ONNX Runtime, the text table, the plot."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from serve.benchenv import InProcess


def report(
    *,
    model: str,
    model_file: str | None,
    target: str | None,
    in_process: InProcess | None,
    servers: list[dict],
    baseline_runs: list[float] | None = None,
    rows: list[dict],
    machine: dict,
) -> dict:
    """The JSON-able report; each row gains ratios to the in-process figures when measured."""
    baseline = None
    if in_process is not None:
        baseline = {
            "threads": {str(b): v for b, v in in_process.threads.items()},
            "throughput": {str(b): v for b, v in in_process.throughput.items()},
            "latency_ms": {str(b): v * 1e3 for b, v in in_process.latency.items()},
            "best_batch": in_process.best_batch,
            "best_throughput": in_process.best,
            "single_throughput": in_process.single or None,
            "single_latency_ms": in_process.latency[1] * 1e3 if 1 in in_process.latency else None,
            # Best-batch img/s of each measurement (before and after the load); the figures
            # above keep the faster of them per batch size.
            "best_throughput_runs": list(baseline_runs or []),
        }
        for row in rows:
            row["ratio_best"] = row["throughput"] / in_process.best
            single = in_process.single
            row["ratio_single"] = row["throughput"] / single if single else None
            # What serving adds to one call: p50 minus in-process ONNX Runtime on that call's
            # images as one batch. Batch 1's latency under --images 4 counted three images'
            # compute as serving overhead.
            one_call = in_process.latency.get(row["images_per_request"])
            row["p50_over_single_ms"] = (
                row["p50_ms"] - one_call * 1e3
                if one_call is not None and row["p50_ms"] is not None
                else None
            )
    return {
        "model": model,
        "model_file": model_file,
        "target": target,
        "machine": machine,
        "in_process": baseline,
        "servers": servers,
        "rows": rows,
    }


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(result: dict) -> str:
    """The human report: in-process figures, one line per setting, server memory."""
    m = result["machine"]
    lines = [f"model {result['model']} ({result['model_file'] or result['target']}); "
             f"{m['cpus']} CPUs, {m['platform']}, python {m['python']}, {m['date']}"]  # fmt: skip
    base = result["in_process"]
    if base is not None:
        per_batch = ", ".join(
            f"b{b} {v:.0f}/s ({base['latency_ms'][b]:.2f} ms, t{base['threads'][b] or 'default'})"
            for b, v in base["throughput"].items()
        )
        runs = base.get("best_throughput_runs") or []
        spread = (
            f" (faster of before/after the load: {' / '.join(f'{r:.0f}' for r in runs)})"
            if len(runs) > 1
            else ""
        )
        lines.append(
            f"in-process ONNX Runtime (best of intra-op threads per batch): {per_batch}; "
            f"best batch {base['best_batch']}: {base['best_throughput']:.0f} img/s{spread}"
        )
    header = (f"{'server':<28} {'load':<20} {'img/s':>8} {'×best':>6} {'×b1':>6} {'p50 ms':>8} "
              f"{'p90 ms':>8} {'p99 ms':>8} {'p50-b1':>7} {'batch':>6} {'busy':>5} {'calls':>8} "
              f"{'RSS MiB':>8} {'cpu ms/call c+s':>15}  errors")  # fmt: skip
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        errors = ", ".join(f"{k} {v}" for k, v in row["errors"].items()) or "0"
        label = f"{row['load']}×{row['images_per_request']}"
        lines.append(
            f"{row['server'][:28]:<28} {label:<20} {row['throughput']:>8.0f} "
            f"{_num(row.get('ratio_best')):>6} {_num(row.get('ratio_single')):>6} "
            f"{_num(row['p50_ms']):>8} {_num(row['p90_ms']):>8} {_num(row['p99_ms']):>8} "
            f"{_num(row.get('p50_over_single_ms')):>7} {_num(row['mean_batch'], 1):>6} "
            f"{_num(row['compute_busy']):>5} "
            f"{row['requests']:>8} {_num(row['server_rss_mb'], 0):>8} "
            f"{_num(row.get('client_cpu_ms_per_call')):>7}+{_num(row.get('server_cpu_ms_per_call')):<7}"
            f"  {errors}"
        )
    for row in result["rows"]:
        if row["fell_behind"]:
            lines.append(
                f"{row['server']} {row['load']}: fell behind the rate: {row['sent']} calls were "
                f"due in the window and {row['requests']} answered in it; {row['late']} due in "
                "it were answered only after it closed (their latencies count in p50/p90/p99); "
                "lower --rate"
            )
    for server in result["servers"]:
        lines.append(
            f"server [{server['label']}]: RSS {_num(server['rss_start_mb'], 1)} MiB after start, "
            f"{_num(server['rss_end_mb'], 1)} MiB after load; exit code {server['exit_code']}"
        )
    return "\n".join(lines)


def check_plot_path(path: Path) -> None:
    """ValueError saying what to do when ``plot`` could not write ``path``, checked before any
    load runs: without matplotlib a run of many minutes once ended in "expected matplotlib"."""
    folder = path.parent
    if path.is_dir():
        raise ValueError(
            f"expected a file for --plot, got the directory {str(path)!r}; pass e.g. "
            f"{str(path / 'bench.png')!r}"
        )
    if not folder.is_dir():
        raise ValueError(
            f"expected --plot in an existing directory, got {str(path)!r}, and "
            f"{str(folder)!r} is not a directory; create it or pick another path"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(
            f"expected --plot in a writable directory, got {str(path)!r} in read-only "
            f"{str(folder)!r}; pick another path"
        )
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(
            "expected matplotlib for --plot, got none installed; pip install '.[bench]', or "
            "leave --plot out"
        )
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = path.suffix[1:].lower()
    if suffix and suffix not in formats:  # no suffix: matplotlib adds .png
        raise ValueError(
            f"expected --plot with a suffix matplotlib writes ({', '.join(sorted(formats))}), "
            f"got {path.suffix!r}; use e.g. .png"
        )


def plot(result: dict, path: Path) -> None:
    """Throughput against p99 latency, one line per server, points labelled by load."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(
            "expected matplotlib for --plot, got none; pip install '.[bench]'"
        ) from e
    figure, axes = plt.subplots(figsize=(7, 4.5))
    servers = dict.fromkeys(row["server"] for row in result["rows"])
    for server in servers:
        rows = [r for r in result["rows"] if r["server"] == server and r["p99_ms"] is not None]
        xs = [r["p99_ms"] for r in rows]
        ys = [r["throughput"] for r in rows]
        axes.plot(xs, ys, marker="o", label=server)
        for r, x, y in zip(rows, xs, ys, strict=True):
            axes.annotate(r["load"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    base = result["in_process"]
    if base is not None:
        axes.axhline(base["best_throughput"], linestyle="--", color="grey",
                     label=f"in-process best (batch {base['best_batch']})")  # fmt: skip
    axes.set_xlabel("p99 latency (ms)")
    axes.set_ylabel("throughput (images/s)")
    axes.set_title(f"{result['model']}: throughput vs p99 latency")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
