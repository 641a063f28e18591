"""PNG plots of one `llmstream bench` run, written next to its JSON (matplotlib, no display).

- `<stamp>-ttft-cdf.png`: TTFT CDF, pipeline vs direct, one pair of curves per concurrency
  (scenario 1, zero-delay engine);
- `<stamp>-tokens-per-s.png`: tokens/s vs concurrency, pipeline vs direct (median run, min-max
  bars; scenario 1), and SmolLM2 through the pipeline vs llama.cpp's server (scenario 3);
- `<stamp>-paced-itl-cdf.png`: inter-token gap CDF, pipeline vs direct (scenario 2);
- `<stamp>-litellm.png`: TTFT added by llmstream and by LiteLLM's proxy (p50 and p99) and
  tokens/s of both vs concurrency, one column per backend (scenario 6).

A plot whose scenario did not run is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"direct": "tab:blue", "pipeline": "tab:orange", "llama.cpp server": "tab:green"}


def write_all(record: dict[str, Any], folder: Path, stamp: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    suites = record.get("suites", {})
    written = []
    pipe = suites.get("pipeline", {}).get("result", {})
    if pipe.get("scenarios"):
        written.append(_ttft_cdf(pipe["scenarios"], folder / f"{stamp}-ttft-cdf.png"))
    llama = suites.get("llamacpp", {}).get("result", {})
    if pipe.get("scenarios") or llama.get("scenarios"):
        written.append(
            _tokens_per_s(
                pipe.get("scenarios", []),
                llama.get("scenarios", []),
                folder / f"{stamp}-tokens-per-s.png",
            )
        )
    paced = suites.get("paced", {}).get("result", {})
    if paced.get("scenarios"):
        written.append(_paced_itl(paced, folder / f"{stamp}-paced-itl-cdf.png"))
    litellm = suites.get("litellm", {}).get("result", {})
    if litellm.get("scenarios"):
        written.append(_litellm(litellm["scenarios"], folder / f"{stamp}-litellm.png"))
    return written


def _cdf_axes(ax: Any, xlabel: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def _ttft_cdf(scenarios: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    for i, s in enumerate(scenarios):
        for label in ("direct", "pipeline"):
            cdf = s[label].get("ttft_cdf_ms") or []
            if not cdf:
                continue
            ys = [k / (len(cdf) - 1) for k in range(len(cdf))]
            ax.plot(
                [max(x, 0.01) for x in cdf],
                ys,
                styles[i % len(styles)],
                color=COLORS[label],
                label=f"{label}, {s['streams']} streams",
            )
    ax.set_title("TTFT, zero-delay synthetic engine (median run)")
    _cdf_axes(ax, "time to first token (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tokens_per_s(pipe: list[dict[str, Any]], llama: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    panels = [
        (title, scenarios)
        for title, scenarios in (
            ("zero-delay synthetic engine", pipe),
            ("SmolLM2-135M via llama.cpp", llama),
        )
        if scenarios
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, scenarios) in zip(axes[0], panels, strict=True):
        labels = [k for k in COLORS if k in scenarios[0]]
        xs = [s["streams"] for s in scenarios]
        for label in labels:
            runs = [s[label] for s in scenarios]
            ys = [r["tokens_per_s"] for r in runs]
            lo = [y - r.get("tokens_per_s_min", y) for y, r in zip(ys, runs, strict=True)]
            hi = [r.get("tokens_per_s_max", y) - y for y, r in zip(ys, runs, strict=True)]
            ax.errorbar(
                xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=COLORS[label], label=label
            )
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("tokens/s (median run, min-max)")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _paced_itl(paced: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    for i, s in enumerate(paced["scenarios"]):
        for label in ("direct", "pipeline"):
            cdf = s[label].get("itl_cdf_ms") or []
            if cdf:
                ys = [k / (len(cdf) - 1) for k in range(len(cdf))]
                ax.plot(
                    [max(x, 0.01) for x in cdf],
                    ys,
                    styles[i % len(styles)],
                    color=COLORS[label],
                    label=f"{label}, {s['streams']} streams",
                )
    ax.axvline(paced["configured_itl_ms"], color="grey", linestyle=":", label="configured ITL")
    ax.set_title(
        f"Gaps between stream messages, paced engine ({paced['configured_itl_ms']:g} ms/token)"
    )
    _cdf_axes(ax, "inter-token gap (ms)")
    ax.set_ylabel("fraction of gaps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _litellm(scenarios: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(s["backend"] for s in scenarios))
    fig, axes = plt.subplots(2, len(backends), figsize=(6 * len(backends), 8), squeeze=False)
    proxies = {"llmstream": "tab:orange", "litellm": "tab:purple"}
    for column, backend in enumerate(backends):
        rows = [s for s in scenarios if s["backend"] == backend]
        xs = [s["streams"] for s in rows]
        ttft, tps = axes[0][column], axes[1][column]
        for who, color in proxies.items():
            for q, style in (("p50", "-"), ("p99", "--")):
                ys = [s["added_ttft_ms"][who][q] for s in rows]
                ttft.plot(xs, ys, style, marker="o", color=color, label=f"{who} {q}")
            tps.plot(xs, [s[who]["tokens_per_s"] for s in rows], marker="o", color=color, label=who)
        ttft.set_title(f"TTFT added to the {backend} backend")
        ttft.set_ylabel("added TTFT (ms, median run)")
        tps.set_title(f"tokens/s through the proxy, {backend} backend")
        tps.set_ylabel("tokens/s (median run)")
        tps.set_ylim(bottom=0)
        for ax in (ttft, tps):
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("concurrent streams")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
