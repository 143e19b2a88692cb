"""PNG plots of a results dict (matplotlib, headless): serving per target, execution per batch."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_serving(results: dict, path: Path) -> list[Path]:
    """Requests/s and p99 per target, grouped by concurrency; one column per model."""
    summary = results["serving"]["summary"]
    models = list(dict.fromkeys(r["model"] for r in summary))
    if not models:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 7), squeeze=False)
    for col, model in enumerate(models):
        rows = [r for r in summary if r["model"] == model]
        _grouped_bars(axes[0][col], rows, "rps", f"{model}: requests/s (img/s in process)")
        _grouped_bars(axes[1][col], rows, "p99_ms", f"{model}: p99 latency, ms")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _grouped_bars(ax, rows: list[dict], key: str, title: str) -> None:
    targets = list(dict.fromkeys(r["target"] for r in rows))
    concs = sorted({r["concurrency"] for r in rows})
    width = 0.8 / len(targets)
    values = {(r["target"], r["concurrency"]): r[key] for r in rows}
    for i, target in enumerate(targets):
        xs = [j + i * width for j in range(len(concs))]
        ax.bar(xs, [values.get((target, c), 0) for c in concs], width, label=target)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(concs))], [f"c={c}" for c in concs])
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)


def plot_model_exec(results: dict, path: Path) -> list[Path]:
    """Images/s against batch size, one panel per (model, threads), one line per config."""
    rows = results["model_exec"]["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    threads = sorted({r["threads"] for r in rows})
    if not models:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(models), len(threads), figsize=(6 * len(threads), 4.2 * len(models)), squeeze=False
    )
    for i, model in enumerate(models):
        for j, t in enumerate(threads):
            _exec_panel(axes[i][j], [r for r in rows if r["model"] == model and r["threads"] == t])
            axes[i][j].set_title(f"{model}, {t} thread(s): images/s vs batch", fontsize=10)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _exec_panel(ax, rows: list[dict]) -> None:
    """Colour by engine and level, solid for the folded model, dotted for the unfolded one."""
    colors = {level: f"C{i}" for i, level in enumerate(("DISABLE_ALL", "BASIC", "EXTENDED", "ALL"))}
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        if "images_per_s" in r:
            lines.setdefault((r["engine"], r["variant"], r["level"]), []).append(r)
    for (engine, variant, level), pts in lines.items():
        color = colors.get(level, "C5" if variant == "folded" else "C4")
        ax.plot(
            [p["batch"] for p in pts],
            [p["images_per_s"] for p in pts],
            "-" if variant == "folded" else ":",
            color=color,
            marker=".",
            label=f"{engine} {variant} {level}",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
