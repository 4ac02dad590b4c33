"""The plots of `mifa report`, drawn with matplotlib (Agg, no display) and returned as PNG bytes.

Each function takes plain numbers (from `inspect.py`'s rows and scans) and returns one figure's PNG, so the
report embeds it as a data URI. Colours are fixed per series (requested / generated / estimated, asked /
kept), so a curator reads every figure the same way.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLOURS = {"requested": "#4c72b0", "generated": "#dd8452", "estimated": "#55a868", "asked": "#8172b3",
           "kept": "#55a868", "dropped": "#c44e52", "same": "#4c72b0", "other": "#dd8452", "threshold": "#c44e52"}
DPI = 80
ZERO = 0.25  # an intensity (or estimate x5) below this counts as the AU at rest


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # no software stamp (PNG carries no date): the same data set gives the same bytes
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _grid(n: int, cols: int, size: tuple[float, float]):
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def au_histograms(aus: list[str], requested: dict[str, list[float]], generated: dict[str, list[float]],
                  estimated: dict[str, list[float]]) -> bytes:
    """Per AU: requested (FACS 0-5) and generated intensity, and the independent estimate (0-1) scaled x5.
    Values under ZERO are counted in the title, not drawn: most samples leave most AUs at rest."""
    fig, axes = _grid(len(aus), 4, (3.2, 2.3))
    bins = np.linspace(0, 5, 11)
    series = (("requested", requested, 1, "-"), ("generated", generated, 1, "-"), ("estimated", estimated, 5, "--"))
    for ax, au in zip(axes, aus):
        at_rest = []
        for name, values, scale, style in series:
            scaled = [scale * v for v in values.get(au, [])]
            shown = [v for v in scaled if v >= ZERO]
            at_rest.append(str(len(scaled) - len(shown)) if scaled else "-")
            label = "estimated x5 (0-1 proxy)" if name == "estimated" else name
            if shown:
                ax.hist(shown, bins=bins, histtype="step", lw=2, ls=style, color=COLOURS[name], label=label)
            else:
                ax.plot([], [], color=COLOURS[name], lw=2, ls=style, label=label)
        ax.set_title(f"{au}  (at rest: {'/'.join(at_rest)})", fontsize=9)
        ax.set_xlim(0, 5)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.supxlabel(f"intensity (FACS 0-5); at rest = below {ZERO}, requested/generated/estimated", fontsize=9)
    fig.supylabel("samples", fontsize=9)
    return _png(fig)


def au_agreement(aus: list[str], rates: dict[str, dict[str, float | None]]) -> bytes:
    """Per AU, grouped bars: each agreement rate in `rates[au]` (series name -> rate 0-1, None: not measured)."""
    series = list(dict.fromkeys(name for r in rates.values() for name in r))
    fig, ax = plt.subplots(layout="constrained", figsize=(max(6.0, 0.65 * len(aus)), 3.2))
    x = np.arange(len(aus))
    width = 0.8 / max(len(series), 1)
    palette = [COLOURS["requested"], COLOURS["generated"], COLOURS["estimated"], COLOURS["asked"]]
    for i, name in enumerate(series):
        values = [np.nan if rates[au].get(name) is None else rates[au][name] for au in aus]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name, color=palette[i % len(palette)])
    ax.set_xticks(x, aus, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("agreement (share of samples)")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def demographics(asked: dict[str, Counter], kept: dict[str, Counter]) -> bytes:
    """Per attribute, horizontal bars: each value's share of the samples asked for vs of those kept."""
    attrs = list(asked)
    heights = [max(1.6, 0.28 * len(asked[a]) + 0.8) for a in attrs]
    fig, axes = plt.subplots(len(attrs), 1, figsize=(7.5, sum(heights)), squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": heights})
    for ax, attr in zip(axes[:, 0], attrs):
        values = sorted(asked[attr], key=lambda v: (-asked[attr][v], str(v)))
        y = np.arange(len(values))
        total_a, total_k = max(sum(asked[attr].values()), 1), max(sum(kept[attr].values()), 1)
        ax.barh(y - 0.2, [asked[attr][v] / total_a for v in values], 0.4, color=COLOURS["asked"], label="asked")
        ax.barh(y + 0.2, [kept[attr].get(v, 0) / total_k for v in values], 0.4, color=COLOURS["kept"], label="kept")
        ax.set_yticks(y, [str(v) for v in values], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(attr, fontsize=10, loc="left")
        ax.tick_params(axis="x", labelsize=8)
    axes[0, 0].legend(fontsize=8, loc="lower right")
    axes[-1, 0].set_xlabel("share of samples")
    return _png(fig)


def identity_similarity(same: list[float], other: list[float], min_cosine: float | None,
                        duplicate_cosine: float | None, other_label: str) -> bytes:
    """Generated face vs its own identity's reference, and each reference vs its nearest other identity."""
    fig, ax = plt.subplots(layout="constrained", figsize=(7.5, 3.2))
    values = [*same, *other] or [0.0, 1.0]
    bins = np.linspace(min(min(values), 0.0), 1.0, 41)
    if same:
        ax.hist(same, bins=bins, alpha=0.6, color=COLOURS["same"], label=f"same identity ({len(same)} samples)")
    if other:
        ax.hist(other, bins=bins, alpha=0.6, color=COLOURS["other"], label=f"{other_label} ({len(other)} identities)")
    for value, text, style in ((min_cosine, "min_cosine", "-"), (duplicate_cosine, "duplicate_cosine", "--")):
        if value is not None:
            ax.axvline(value, color=COLOURS["threshold"], ls=style, lw=1.5, label=f"{text} = {value:g}")
    ax.set_xlabel("embedding cosine")
    ax.set_ylabel("count")
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def drop_reasons(counts: dict[str, int]) -> bytes:
    fig, ax = plt.subplots(layout="constrained", figsize=(6.5, max(1.4, 0.35 * len(counts) + 0.8)))
    names = sorted(counts, key=lambda r: (-counts[r], r))
    ax.barh(names, [counts[n] for n in names], color=COLOURS["dropped"])
    ax.invert_yaxis()
    ax.set_xlabel("samples dropped")
    for i, n in enumerate(names):
        ax.text(counts[n], i, f" {counts[n]}", va="center", fontsize=8)
    return _png(fig)


def threshold_curves(curves: list[dict[str, Any]]) -> bytes:
    """Per thresholded score: samples kept vs the setting's value, the current value marked."""
    fig, axes = _grid(len(curves), 3, (3.6, 2.6))
    for ax, c in zip(axes, curves):
        ax.plot(c["values"], c["kept"], color=COLOURS["kept"], lw=2, drawstyle="steps-post")
        if c["current"] is not None:
            ax.axvline(c["current"], color=COLOURS["threshold"], lw=1.5, ls="--",
                       label=f"now {c['current']:g}: {c['kept_now']} kept")
        else:
            ax.plot([], [], " ", label=f"now off: {c['kept_now']} kept")
        ax.set_title(f"{c['setting']}\n(drops {c['score']} {c['drops']})", fontsize=8.5)
        ax.set_ylim(-0.5, c["total"] * 1.05 + 0.5)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="best")
    fig.supylabel("samples kept", fontsize=9)
    return _png(fig)
