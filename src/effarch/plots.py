"""The few plot helpers the labs share: every figure names the device it was measured on.

Each function draws on a new figure (or on ``ax``) and returns the matplotlib ``Figure``; the
notebook shows it. Units are in the axis labels. ``explore`` puts an ipywidgets control next to a
plot and falls back to a plain call where ipywidgets is missing, so a lab runs the same in CI.
"""

from __future__ import annotations

import functools
import math
import os
import platform
from collections.abc import Callable, Mapping, Sequence

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def device_name(device: str) -> str:
    """A readable name for a device string: the GPU's name, or the CPU's model and core count."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
    if str(device) == "cpu":
        return f"CPU ({_cpu_model()}, {os.cpu_count()} cores)"
    return str(device)


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"`` (binary prefixes)."""
    if n <= 0:
        return "0 B"
    k = min(int(math.log(n, 1024)), len(_BYTE_UNITS) - 1)
    value = n / 1024**k
    return f"{value:.0f} {_BYTE_UNITS[k]}" if value >= 100 or k == 0 else \
        f"{value:.3g} {_BYTE_UNITS[k]}"


def _figure(ax, size=(7, 4)):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=size)
    return fig, ax


def _label(fig, ax, xlabel: str, ylabel: str, title: str, device: str, *,
           grid_minor: bool = False):
    """Axis labels with units, a title naming the device it was measured on, grid, legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} — {device_name(device)}")
    ax.grid(True, which="both" if grid_minor else "major", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def memory_vs_context(lengths: Sequence[int], series: Mapping[str, Sequence[float]], *,
                      device: str, memory_bytes: float | None = None,
                      memory_label: str = "device memory", ax=None):
    """Bytes of inference state against context length, log-log (lab 2.4.1, Part B).

    ``series`` maps a label to one value per length; ``memory_bytes`` draws a horizontal line.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig, ax = _figure(ax)
    for label, values in series.items():
        ax.loglog(lengths, values, marker="o", markersize=3, label=label)
    if memory_bytes:
        ax.axhline(memory_bytes, color="black", linestyle="--",
                   label=f"{memory_label}: {format_bytes(memory_bytes)}")
    ax.yaxis.set_major_locator(FixedLocator([32.0**k for k in range(13)]))  # 1 B, 32 B, 1 KiB …
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: format_bytes(y)))
    return _label(fig, ax, "context length (tokens, log scale)",
                  "inference state (bytes, log scale)",
                  "Inference-state memory against context", device, grid_minor=True)


def latency_vs_context(frames: Mapping[str, object], *, device: str,
                       metric: str = "decode_ms_per_token", ax=None):
    """A measured latency against prompt length, one line per results frame (lab 2.4.1, Part C).

    ``metric``: ``decode_ms_per_token`` (error bars: the interquartile range of the steps) or
    ``ttft_s`` (error bars: min to max of the repeats, drawn in milliseconds). Skipped rows
    (``skipped`` not null) are left out.
    """
    fig, ax = _figure(ax)
    for label, df in frames.items():
        ok = df[df["skipped"].isna()] if "skipped" in df else df
        x = ok["prompt_length"].to_numpy()
        if metric == "ttft_s":
            y = ok["ttft_s"].to_numpy() * 1e3
            err = [y - ok["ttft_min_s"].to_numpy() * 1e3, ok["ttft_max_s"].to_numpy() * 1e3 - y]
        else:
            y = ok[metric].to_numpy()
            half = ok[f"{metric}_iqr"].to_numpy() / 2 if f"{metric}_iqr" in ok else None
            err = half
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    names = {"decode_ms_per_token": "decode latency (ms per generated token)",
             "ttft_s": "time to first token, prefill (ms)"}
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    return _label(fig, ax, "prompt length (tokens, log scale)", names.get(metric, metric),
                  f"{names.get(metric, metric).split(' (')[0].capitalize()} against context",
                  device)


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """One readable label per token id: spaces as ``·``, newlines as ``↵``, tabs as ``→``."""
    out = []
    for i in ids:
        text = tokenizer.decode([int(i)])
        out.append(text.replace(" ", "·").replace("\n", "↵").replace("\t", "→") or "∅")
    return out


def token_heatmap(values, tokens: Sequence[str], *, device: str, title: str,
                  row_label: str = "channel", value_label: str = "Δ", ax=None):
    """A (rows, tokens) heatmap with the tokens as x labels (lab 2.4.2, Part E).

    ``values``: a tensor or array (rows, l) — e.g. Δ of some channels at every token.
    """
    import numpy as np

    values = np.asarray(values.detach().cpu().float() if hasattr(values, "detach") else values)
    width = min(max(6.0, 0.18 * len(tokens)), 24.0)
    fig, ax = _figure(ax, size=(width, 4))
    im = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels(tokens, rotation=90, fontsize=7, family="monospace")
    ax.set_xlabel("token")
    ax.set_ylabel(row_label)
    ax.set_title(f"{title} — {device_name(device)}")
    fig.colorbar(im, ax=ax, label=value_label)
    return fig


def scan_timings(lengths: Sequence[int], timings: Mapping[str, Sequence[object]], *,
                 device: str, ax=None):
    """Median time (ms, with min–max bars) of several scans against sequence length, log-log
    (lab 2.4.2, Part C). ``timings`` maps a label to one ``bench.Timing`` per length."""
    fig, ax = _figure(ax)
    for label, ts in timings.items():
        med = [t.median * 1e3 for t in ts]
        err = [[(t.median - t.min) * 1e3 for t in ts], [(t.max - t.median) * 1e3 for t in ts]]
        ax.errorbar(lengths, med, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    return _label(fig, ax, "sequence length l (tokens, log scale)",
                  "time per scan (ms, log scale)", "Sequential against parallel scan", device,
                  grid_minor=True)


def explore(fn: Callable, **controls) -> None:
    """Draw ``fn()`` — its default view, from its default arguments — then ipywidgets controls
    (``interact``'s abbreviations: ``(1, 64)`` a slider, a list a dropdown) that redraw it below
    when moved. The default view is a plain output, so it shows without a widget frontend (CI, a
    static render); without ipywidgets only it is drawn. ``fn`` stays a plain function: call it
    with any arguments to get the same views without widgets.
    """
    fn()
    try:
        import ipywidgets
        from IPython.display import display
    except ImportError:
        return
    panel = ipywidgets.interactive(fn, {"manual": True}, **controls)  # manual: no second draw now
    panel.manual_button.layout.display = "none"
    for control in panel.kwargs_widgets:
        control.observe(panel.update, names="value")
    display(panel)


# =============================================================================================
# Lab 2.4.5 (architecture comparison): plots of the harness's tables (effarch.compare) and of
# the recall accuracies (effarch.recall). Every point is a measured row.
# =============================================================================================


def _by_model(table, **where):
    """``(model, rows sorted by context then batch)`` for each model of the table, in order."""
    rows = table
    for column, value in where.items():
        rows = rows[rows[column] == value]
    for model in dict.fromkeys(rows["model"]):
        yield model, rows[rows["model"] == model].sort_values(["context", "batch_size"])


def state_vs_context(table, *, device: str, batch_size: int = 1, ax=None):
    """Inference-state bytes (measured on the real cache) against context, log-log, one line per
    model of a harness table, at one batch size (lab 2.4.5)."""
    from matplotlib.ticker import FuncFormatter

    fig, ax = _figure(ax)
    for model, rows in _by_model(table, batch_size=batch_size):
        ax.loglog(rows["context"], rows["state_bytes"], marker="o", label=model)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: format_bytes(y)))
    ax.set_xscale("log", base=2)
    return _label(fig, ax, "context (tokens, log scale)", "inference state (bytes, log scale)",
                  f"State after the prompt, batch {batch_size}", device, grid_minor=True)


def decode_vs_context(table, *, device: str, batch_size: int = 1, crossover=None, ax=None):
    """Decode time per generated token (ms) against context, log-log, one line per model; error
    bars carry the interquartile range of tokens/s to milliseconds to first order
    (ms · IQR / rate / 2 each side). ``crossover``: an ``effarch.compare.Crossover`` to mark."""
    fig, ax = _figure(ax)
    for model, rows in _by_model(table, batch_size=batch_size):
        ms = rows["decode_ms_per_token"]
        half = ms * rows["decode_tok_s_iqr"] / rows["decode_tok_s"] / 2
        ax.errorbar(rows["context"], ms, yerr=half, marker="o", capsize=3, label=model)
    if crossover is not None and crossover.context is not None:
        ax.axvline(crossover.context, color="black", linestyle="--",
                   label=f"crossover ≈ {crossover.context:,.0f} tokens (interpolated)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    return _label(fig, ax, "context (tokens, log scale)",
                  "decode time per generated token (ms, log scale)",
                  f"Decode time against context, batch {batch_size}", device, grid_minor=True)


def throughput_vs_batch(table, *, device: str, context: int, ax=None):
    """Decode tokens/s summed over the batch against batch size at one context, log-log, one
    line per model; error bars: the interquartile range (lab 2.4.5)."""
    fig, ax = _figure(ax)
    for model, rows in _by_model(table, context=context):
        ax.errorbar(rows["batch_size"], rows["decode_tok_s"], yerr=rows["decode_tok_s_iqr"] / 2,
                    marker="o", capsize=3, label=model)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    return _label(fig, ax, "batch size (log scale)", "decode tokens/s, whole batch (log scale)",
                  f"Throughput against batch size at {context:,} tokens", device,
                  grid_minor=True)


def pareto(points, *, front: Sequence[bool], device: str, xlabel: str, ylabel: str,
           title: str, log_x: bool = True, ax=None):
    """A Pareto plot: ``points`` maps a model to (x, y); ``front`` marks, in the same order,
    the models no other beats on both axes (``effarch.compare.pareto_front``), drawn larger and
    joined by a line."""
    fig, ax = _figure(ax)
    names = list(points)
    for name, on in zip(names, front, strict=True):
        x, y = points[name]
        ax.scatter([x], [y], s=90 if on else 40, marker="*" if on else "o",
                   label=f"{name}{' (front)' if on else ''}")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    on_front = sorted(points[n] for n, on in zip(names, front, strict=True) if on)
    if len(on_front) > 1:
        ax.plot(*zip(*on_front, strict=True), color="gray", linestyle=":", label="Pareto front")
    if log_x:
        ax.set_xscale("log")
    return _label(fig, ax, xlabel, ylabel, title, device)


def recall_vs_pairs(recall_table, *, device: str, ax=None):
    """MQAR accuracy on the queried values against the number of key-value pairs, one line per
    recall model (lab 2.4.5, Part E)."""
    fig, ax = _figure(ax)
    for model, rows in dict(tuple(recall_table.groupby("model", sort=False))).items():
        rows = rows.sort_values("num_pairs")
        ax.plot(rows["num_pairs"], rows["accuracy"], marker="o", label=model)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    return _label(fig, ax, "key-value pairs in the sequence (log scale)",
                  "accuracy on the queried values", "Associative recall against pairs", device)


def recall_vs_state(recall_table, *, device: str, ax=None):
    """Mamba's MQAR accuracy against its state size ``d_state``, one line per number of pairs;
    the attention model's accuracy at the same number of pairs as a dotted line (lab 2.4.5)."""
    fig, ax = _figure(ax)
    mamba = recall_table[recall_table["arch"] == "mamba"]
    attention = recall_table[recall_table["arch"] == "attention"]
    for pairs, rows in mamba.groupby("num_pairs"):
        rows = rows.sort_values("d_state")
        line, = ax.plot(rows["d_state"], rows["accuracy"], marker="o", label=f"{pairs} pairs")
        same = attention[attention["num_pairs"] == pairs]["accuracy"]
        if not same.empty:
            ax.axhline(float(same.iloc[0]), color=line.get_color(), linestyle=":", alpha=0.7)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    return _label(fig, ax, "Mamba d_state (log scale); dotted: attention at the same pairs",
                  "accuracy on the queried values", "Recall against Mamba's state size", device)
