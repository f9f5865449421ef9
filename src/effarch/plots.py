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


# (x, y, text) of the Mamba block's boxes, and the arrows between them: (from, to, label, the
# point of each box they leave and reach, as fractions of its box) (lab 2.4.2, Part B)
_BLOCK_BOXES = {
    "x": (0.0, 1.0, "x\n(b, l, H)"),
    "in_proj": (1.4, 1.0, "in_proj\nH → 2d"),
    "conv": (3.1, 1.9, "conv1d: causal,\ndepthwise, kernel k"),
    "act": (4.7, 1.9, "SiLU"),
    "x_proj": (6.1, 3.0, "x_proj\nd → r + 2n"),
    "dt_proj": (8.0, 3.0, "dt_proj: r → d\n+ bias, softplus"),
    "scan": (9.4, 1.9, "selective scan (A, D)\nh_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t\n"
                       "y_t = C_t · h_t + D u_t"),
    "gate_act": (4.7, 0.2, "SiLU"),
    "mul": (9.4, 0.2, "×"),
    "out_proj": (11.0, 0.2, "out_proj\nd → H"),
    "out": (12.6, 0.2, "output\n(b, l, H)"),
}
_RIGHT, _LEFT, _TOP, _BOTTOM = (1, 0.5), (0, 0.5), (0.5, 1), (0.5, 0)
_BLOCK_ARROWS = [
    ("x", "in_proj", "", _RIGHT, _LEFT), ("in_proj", "conv", "x (b, d, l)", _RIGHT, _LEFT),
    ("conv", "act", "", _RIGHT, _LEFT), ("act", "x_proj", "u", _TOP, _LEFT),
    ("x_proj", "dt_proj", "Δ (b, l, r)", _RIGHT, _LEFT),
    ("dt_proj", "scan", "Δ (b, d, l)", _BOTTOM, (0.75, 1)),
    ("x_proj", "scan", "B, C (b, n, l)", _BOTTOM, (0.3, 1)),
    ("act", "scan", "u (b, d, l)", _RIGHT, _LEFT),
    ("in_proj", "gate_act", "z (b, d, l)", _RIGHT, _LEFT),
    ("gate_act", "mul", "silu(z)", _RIGHT, _LEFT), ("scan", "mul", "y", _BOTTOM, _TOP),
    ("mul", "out_proj", "", _RIGHT, _LEFT), ("out_proj", "out", "", _RIGHT, _LEFT)]


def mamba_block_diagram(ax=None):
    """The Mamba block's mixer as transformers' ``MambaMixer`` computes it (Gu & Dao 2023,
    Fig. 3; the residual connection and the RMSNorm before the mixer are outside it), with the
    shapes of lab 2.4.2: b batch, l length, H hidden, d = expand · H channels, n state size,
    r Δ's rank, k the conv kernel. A (d, n) = −exp(A_log) and D (d,) are parameters."""
    fig, ax = _figure(ax, size=(14, 4.4))
    ax.set_xlim(-0.6, 13.4)
    ax.set_ylim(-0.4, 3.6)
    ax.axis("off")
    boxes = {}
    for key, (x, y, text) in _BLOCK_BOXES.items():
        face, edge = ("#fdf1e3", "#c77b1a") if key == "scan" else ("#eef3fb", "#3b6fb6")
        boxes[key] = ax.text(x, y, text, ha="center", va="center", fontsize=8,
                             bbox=dict(boxstyle="round,pad=0.4", fc=face, ec=edge))
    for start, end, label, leave, reach in _BLOCK_ARROWS:
        ax.annotate("", xy=reach, xycoords=boxes[end], xytext=leave, textcoords=boxes[start],
                    arrowprops=dict(arrowstyle="-|>", color="#555", shrinkA=4, shrinkB=4))
        if label:
            (x0, y0, _), (x1, y1, _) = _BLOCK_BOXES[start], _BLOCK_BOXES[end]
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.15, label, fontsize=7, color="#333",
                    ha="center")
    ax.set_title("The Mamba block (transformers' MambaMixer): what Exercises B2 and B3 compute")
    return fig


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


# --- lab 2.4.3: routing of a mixture of experts ----------------------------------------------


def expert_shares(shares, *, domains: Sequence[str], layer: int, device: str, pooled=None,
                  highlight: str | None = None, ax=None):
    """Expert share per domain against the uniform share 1/E, as log2(share · E): 0 (white) is
    uniform, +1 twice, -1 half (lab 2.4.3, Part C). ``shares``: (D, E) rows summing to 1;
    ``pooled`` (E,) adds a row for all documents; ``highlight`` frames one domain's row."""
    import numpy as np
    from matplotlib.patches import Rectangle

    rows = np.asarray(shares, dtype=float)
    labels = list(domains)
    if pooled is not None:
        rows, labels = np.vstack([rows, np.asarray(pooled, dtype=float)]), labels + ["all"]
    e = rows.shape[1]
    ratio = np.log2(np.clip(rows * e, 1 / 64, 64))
    fig, ax = _figure(ax, size=(min(max(6.0, 0.35 * e + 2), 16), 0.5 * len(labels) + 2))
    im = ax.imshow(ratio, cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xticks(range(0, e, max(1, e // 16)))
    if e <= 16:
        for (i, j), s in np.ndenumerate(rows):
            ax.text(j, i, f"{100 * s:.0f}", ha="center", va="center", fontsize=7)
    if highlight in labels:
        i = labels.index(highlight)
        ax.add_patch(Rectangle((-0.5, i - 0.5), e, 1, fill=False, lw=2, color="black"))
    ax.set_xlabel("expert" + (" (numbers: % of the row's assignments)" if e <= 16 else ""))
    ax.set_title(f"Expert share ÷ uniform share 1/{e}, layer {layer} — {device_name(device)}")
    fig.colorbar(im, ax=ax, label="log2(share · E): +1 = twice uniform")
    return fig


def domain_expert_bars(share, pooled, *, domain: str, layer: int, device: str, ax=None):
    """One domain's expert shares beside all documents' and the uniform 1/E (lab 2.4.3)."""
    import numpy as np

    share, pooled = np.asarray(share, dtype=float), np.asarray(pooled, dtype=float)
    e = len(share)
    fig, ax = _figure(ax, size=(min(max(6.0, 0.3 * e + 2), 16), 3.5))
    x = np.arange(e)
    ax.bar(x - 0.2, share, width=0.4, label=domain)
    ax.bar(x + 0.2, pooled, width=0.4, label="all documents", alpha=0.6)
    ax.axhline(1 / e, color="black", linestyle="--", label=f"uniform 1/{e}")
    ax.set_xticks(x[:: max(1, e // 16)])
    return _label(fig, ax, "expert", "share of the top-k assignments",
                  f"Expert shares, layer {layer}, {domain}", device)


def same_expert_rates(labels: Sequence[str], rates, chances, uniform, *, device: str,
                      title: str = "Consecutive tokens keeping their first-choice expert",
                      ax=None):
    """Measured same-expert rate of consecutive tokens per layer, against Σ loadᵢ² (chance under
    the measured load) and 1/E (chance under an even load) (lab 2.4.3, Part D)."""
    import numpy as np

    x = np.arange(len(labels))
    fig, ax = _figure(ax, size=(max(6.0, 0.7 * len(labels) + 2), 3.8))
    ax.bar(x - 0.2, rates, width=0.4, label="measured")
    ax.bar(x + 0.2, chances, width=0.4, label="chance: Σ loadᵢ² (measured load)")
    ax.scatter(x, uniform, marker="_", s=400, color="black", label="1/E (even load)", zorder=3)
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 6 else 0, ha="right"
                  if len(labels) > 6 else "center")
    ax.set_ylim(0, 1)
    return _label(fig, ax, "MoE layer", "share of consecutive pairs", title, device)


def token_experts(experts, tokens: Sequence[str], *, n_experts: int, row_labels: Sequence[str],
                  device: str, title: str, ax=None):
    """First-choice expert of every token (columns) in every MoE layer (rows), one colour per
    expert (lab 2.4.3, Part D). ``experts``: (layers, tokens) ints."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import ListedColormap

    values = np.asarray(experts)
    base = matplotlib.colormaps["tab20" if n_experts <= 20 else "nipy_spectral"]
    cmap = ListedColormap([base(i / max(1, n_experts - 1)) if n_experts > 20 else base(i)
                           for i in range(n_experts)])
    width = min(max(6.0, 0.18 * len(tokens)), 24.0)
    fig, ax = _figure(ax, size=(width, 0.45 * len(row_labels) + 2.2))
    im = ax.imshow(values, cmap=cmap, vmin=-0.5, vmax=n_experts - 0.5, aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7, family="monospace")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("token")
    ax.set_title(f"{title} — {device_name(device)}")
    fig.colorbar(im, ax=ax, label="first-choice expert",
                 ticks=range(0, n_experts, max(1, n_experts // 16)))
    return fig


def _two_line_title(ax, title: str, device: str) -> None:
    """The title on one line and the machine it was measured on below it (narrow panels)."""
    ax.set_title(f"{title}\n{device_name(device)}", fontsize=10)


def loss_curves(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], *, device: str,
                title: str = "LoRA fine-tuning", ax=None):
    """Training loss (lines) and held-out loss (markers) against the optimiser step, one colour
    per run (lab 2.4.6). ``curves`` maps a label to ``{"train": [(step, loss)], "eval": [...]}``
    as ``effarch.finetune.loss_curve`` returns; ``device`` names where the runs were measured
    (a device string, or a description of another machine)."""
    fig, ax = _figure(ax)
    for i, (label, curve) in enumerate(curves.items()):
        color = f"C{i}"
        if curve.get("train"):
            steps, losses = zip(*curve["train"], strict=True)
            ax.plot(steps, losses, color=color, label=f"{label}: training loss")
        if curve.get("eval"):
            steps, losses = zip(*curve["eval"], strict=True)
            ax.plot(steps, losses, "o--", color=color, label=f"{label}: held-out loss")
    ax.set_yscale("log")
    _label(fig, ax, "optimiser step", "loss on the answer tokens (nats per token, log)", title,
           device)
    _two_line_title(ax, title, device)
    return fig


def training_memory(summaries: Mapping[str, Mapping[str, float]], *, device: str, ax=None):
    """Stacked bars of one training step's counted bytes, in MiB — weights, gradients, optimiser
    state, activations saved for the backward pass — one bar per setup (lab 2.4.6).
    ``summaries`` maps a label to ``effarch.finetune.StepBytes.summary()``."""
    fig, ax = _figure(ax)
    parts = ("weights", "gradients", "optimizer", "activations")
    labels = list(summaries)
    bottom = [0.0] * len(labels)
    for part in parts:
        values = [float(summaries[lab].get(part, 0)) / 2**20 for lab in labels]
        ax.bar(labels, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for x, total in enumerate(bottom):
        ax.annotate(format_bytes(total * 2**20), (x, total), ha="center", va="bottom", fontsize=8)
    return _label(fig, ax, "setup", "MiB (counted)", "Memory of one training step", device)


def lora_sweep(sweep, *, device: str, axes=None):
    """Lab 2.4.6's rank/targets sweep: held-out loss against trainable parameters (left) and
    training-state KiB against rank (right), one marker per config. ``sweep`` is the DataFrame
    ``effarch.finetune.sweep`` returns."""
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    else:
        fig = axes[0].figure
    left, right = axes
    for i, (targets, group) in enumerate(sweep.groupby("targets", sort=False)):
        left.plot(group["trainable"], group["eval_loss"], "o-", color=f"C{i}", label=targets)
        right.plot(group["rank"], group["state_bytes"] / 1024, "o-", color=f"C{i}",
                   label=targets)
        for _, row in group.iterrows():
            left.annotate(f"r={row['rank']}", (row["trainable"], row["eval_loss"]), fontsize=8,
                          xytext=(3, 3), textcoords="offset points")
    left.set_xscale("log")
    right.set_xscale("log", base=2)
    _label(fig, left, "trainable parameters (log scale)", "held-out loss (nats per answer token)",
           "Quality against adapter size", device)
    _label(fig, right, "LoRA rank r (log scale)", "weights + gradients + AdamW state (KiB)",
           "Training state against rank", device)
    _two_line_title(left, "Quality against adapter size", device)
    _two_line_title(right, "Training state against rank", device)
    fig.tight_layout()
    return fig


# --- lab 2.4.4: the router -------------------------------------------------------------------


def layer_loads(loads: Mapping[str, Sequence[float]], *, device: str, title: str = "Expert load",
                ax=None):
    """Each MoE layer's expert load (share of top-k assignments) as bars, experts sorted from
    busiest to idlest, against the even share 1/E (lab 2.4.4, Part D). ``loads``: label → (E,)."""
    import numpy as np

    fig, ax = _figure(ax, size=(8, 3.8))
    n = len(loads)
    for j, (label, load) in enumerate(loads.items()):
        load = np.sort(np.asarray(load, dtype=float))[::-1]
        x = np.arange(len(load)) + (j - (n - 1) / 2) * 0.8 / n
        ax.bar(x, load, width=0.8 / n, label=label)
    e = max(len(v) for v in loads.values())
    ax.axhline(1 / e, color="black", linestyle="--", label=f"even share 1/{e}")
    return _label(fig, ax, "expert rank (busiest first)", "share of the top-k assignments",
                  title, device)


def capacity_curves(factors: Sequence[float], curves: Mapping[str, Sequence[float]], *,
                    device: str, ylabel: str = "share dropped",
                    title: str = "Token dropping against capacity factor", ax=None):
    """Drop rates (or any measure) against the capacity factor, one line per curve; a dotted
    line at capacity factor 1, the even share (lab 2.4.4, Part C)."""
    fig, ax = _figure(ax)
    for label, values in curves.items():
        ax.plot(factors, values, marker="o", markersize=3, label=label)
    ax.axvline(1.0, color="grey", linestyle=":", label="capacity = even share")
    ax.set_ylim(bottom=0)
    return _label(fig, ax, "capacity factor (capacity ÷ even share T·k/E)", ylabel, title, device)


def topk_quality(ks: Sequence[int], perplexity: Mapping[str, Sequence[float]], *, device: str,
                 trained_k: int | None = None, title: str = "Perplexity against experts per token",
                 ax=None):
    """Perplexity against the number of experts each token uses at inference, one line per
    model; a dotted line at the k the model was trained with (lab 2.4.4, Part D)."""
    fig, ax = _figure(ax)
    for label, values in perplexity.items():
        ax.plot(ks, values, marker="o", label=label)
    if trained_k is not None:
        ax.axvline(trained_k, color="grey", linestyle=":", label=f"trained with k = {trained_k}")
    ax.set_xticks(list(ks))
    return _label(fig, ax, "experts per token at inference (k)", "perplexity (validation text)",
                  title, device)


def load_over_steps(runs: Mapping[str, object], *, device: str, title: str = "Expert load "
                    "during training", axes=None):
    """Each expert's share of the assignments at every training step, stacked (one colour per
    expert, the same expert in the same colour), one panel per run (lab 2.4.4, Part E).
    ``runs``: label → (steps, E) array."""
    import matplotlib
    import matplotlib.pyplot as plt
    import numpy as np

    if axes is None:
        fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.8), sharey=True,
                                 squeeze=False)
        axes = axes[0]
    fig = axes[0].figure
    for ax, (label, load) in zip(axes, runs.items(), strict=True):
        load = np.asarray(load, dtype=float)
        e = load.shape[1]
        colours = matplotlib.colormaps["tab20"](np.arange(e) % 20)
        ax.stackplot(np.arange(len(load)), load.T, colors=colours, linewidth=0)
        for j in range(1, e):
            ax.axhline(j / e, color="white", linewidth=0.4, alpha=0.6)
        ax.set_xlim(0, len(load) - 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("training step")
        ax.set_title(label, fontsize=10)
    axes[0].set_ylabel("share of the assignments (stacked by expert)")
    fig.suptitle(f"{title} — {device_name(device)}")
    fig.tight_layout()
    return fig


def capacity_bars(load, kept, capacity: int, *, layer: int, capacity_factor: float, device: str,
                  ax=None):
    """One MoE layer's assignments per expert at a capacity: kept (solid) and dropped (hatched)
    against the capacity C (lab 2.4.4, Part C). ``load``, ``kept``: (E,) counts."""
    import numpy as np

    load, kept = np.asarray(load), np.asarray(kept)
    e = len(load)
    fig, ax = _figure(ax, size=(min(max(6.0, 0.3 * e + 2), 16), 3.6))
    x = np.arange(e)
    ax.bar(x, kept, label="kept")
    ax.bar(x, load - kept, bottom=kept, hatch="//", alpha=0.5, label="dropped")
    ax.axhline(capacity, color="black", linestyle="--", label=f"capacity C = {capacity}")
    ax.axhline(load.sum() / e, color="grey", linestyle=":", label="even share T·k/E")
    ax.set_xticks(x[:: max(1, e // 16)])
    return _label(fig, ax, "expert", "assignments",
                  f"Layer {layer}, capacity factor {capacity_factor:g}", device)

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
