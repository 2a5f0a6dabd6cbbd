"""Matplotlib figures of the benchmark results (PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

from vllm_tokcomp.bench.common import FULL_IMAGE_TOKENS, OFF, PLAIN, amdahl_speedup


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_method(arms: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for arm in arms:
        if arm.get("method"):
            groups.setdefault(arm["method"], []).append(arm)
    for rows in groups.values():
        rows.sort(key=lambda a: a["budget"])
    return groups


def _budget_axis(ax, budgets: list[int]) -> None:  # noqa: ANN001
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(b) for b in budgets])
    ax.set_xlabel("visual tokens kept per image (budget)")
    ax.grid(True, alpha=0.3)


def _reference_lines(ax, arms: dict, key) -> None:  # noqa: ANN001
    styles = {PLAIN: ("black", "--", "plain vLLM"), OFF: ("grey", ":", "plugin, compression off")}
    for name, (colour, style, label) in styles.items():
        if name in arms and key(arms[name]) is not None:
            ax.axhline(key(arms[name]), color=colour, linestyle=style, linewidth=1.2, label=label)


def plot_throughput(result: dict, path: Path) -> Path:
    plt = _plt()
    arms = {a["name"]: a for a in result["arms"]}
    groups = _by_method(result["arms"])
    budgets = sorted({a["budget"] for a in result["arms"] if a.get("budget")})
    text = result["text_tokens"]
    full = result["model"].get("image_tokens", FULL_IMAGE_TOKENS)
    memory = result["benchmark"] == "memory_bound"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    title = result["model"].get("preset") or Path(result["model"]["path"]).name
    device = (result["machine"].get("gpu") or {}).get("name") or f"CPU x{result['machine'].get('cpus_available')}"
    base = arms.get(PLAIN) or arms.get(OFF)
    if memory:
        for method, rows in groups.items():
            left.plot([r["budget"] for r in rows], [r["steps"]["max_running"] for r in rows], "o-", label=method)
        _reference_lines(left, arms, lambda a: a["steps"]["max_running"])
        if base and budgets:
            dense = _dense(budgets)
            goal = [0.95 * (text + full) / (text + min(b, full)) * base["steps"]["max_running"] for b in dense]
            left.plot(dense, goal, color="tab:red", linewidth=1, label=f"goal 0.95·(t+{full})/(t+b)·plain")
        left.set_ylabel("max concurrently running requests")
        left.set_title(f"{title}: fixed KV cache ({result['engines'].get('plugin', {}).get('num_kv_blocks')} blocks)")
    else:
        for method, rows in groups.items():
            left.plot([r["budget"] for r in rows], [r["requests_per_s"] for r in rows], "o-", label=method)
        _reference_lines(left, arms, lambda a: a["requests_per_s"])
        if base and budgets:
            dense = _dense(budgets)
            share = base["time"]["encoder_share"]
            ratio = [(text + min(b, full)) / (text + full) for b in dense]
            left.plot(dense, [base["requests_per_s"] * amdahl_speedup(share, r) for r in ratio], color="tab:red",
                      linewidth=1.2, label=f"Amdahl bound (encoder share {100 * share:.1f}%)")
            t = base["time"]
            rest = base["wall_s"] - t["encoder_s"] - t["lm_prefill_s"]
            phase = [base["requests_per_s"] * base["wall_s"] / (t["encoder_s"] + t["lm_prefill_s"] * r + rest)
                     for r in ratio]
            left.plot(dense, phase, color="tab:red", linestyle="--", linewidth=1,
                      label="bound if only LM prefill shrinks")
        left.set_ylabel("requests / s")
        left.set_title(f"{title}: offline throughput ({device})")
    _budget_axis(left, budgets)
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)

    if memory:
        for method, rows in groups.items():
            right.plot([r["budget"] for r in rows], [r["requests_per_s"] for r in rows], "o-", label=method)
        _reference_lines(right, arms, lambda a: a["requests_per_s"])
        right.set_ylabel("requests / s")
        right.set_title("throughput under the fixed KV cache")
    else:
        def ttft(a: dict) -> float | None:
            return a["latency_s"]["ttft_engine"].get("median")

        for method, rows in groups.items():
            right.plot([r["budget"] for r in rows], [ttft(r) for r in rows], "o-", label=method)
        _reference_lines(right, arms, ttft)
        right.set_ylabel("median time to first token, s (engine, full batch)")
        right.set_title("TTFT vs budget")
    _budget_axis(right, budgets)
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_serving(result: dict, path: Path) -> Path:
    plt = _plt()
    levels = sorted({row["load"] for row in result["levels"]}, key=_load_key)
    rows = result["levels"]
    methods = sorted({r["method"] for r in rows if r.get("method")})
    budgets = sorted({r["budget"] for r in rows if r.get("budget")})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    title = result["model"].get("preset") or Path(result["model"]["path"]).name
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, level in enumerate(levels):
        colour = colours[i % len(colours)]
        for j, method in enumerate(methods):
            sel = [r for r in rows if r["load"] == level and r.get("method") == method]
            sel.sort(key=lambda r: r["budget"])
            style = ["o-", "s--", "^-.", "d:"][j % 4]
            axes[0].plot([r["budget"] for r in sel], [r["output_tokens_per_s"] for r in sel], style, color=colour,
                         label=f"{method}, {level}")
            axes[1].plot([r["budget"] for r in sel], [r["latency_ms"]["ttft"].get("median") for r in sel], style,
                         color=colour, label=f"{method}, {level}")
        for r in rows:
            if r["load"] == level and r["arm"] == PLAIN:
                axes[0].axhline(r["output_tokens_per_s"], color=colour, linestyle="--", linewidth=0.8)
                axes[1].axhline(r["latency_ms"]["ttft"].get("median") or 0, color=colour, linestyle="--",
                                linewidth=0.8, label=f"plain vLLM, {level}")
    axes[0].set_ylabel("output tokens / s")
    axes[0].set_title(f"{title}: serving throughput (dashed: plain vLLM)")
    axes[1].set_ylabel("median TTFT, ms")
    axes[1].set_title("TTFT vs budget")
    for ax in axes:
        _budget_axis(ax, budgets)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _load_key(load: str) -> tuple:
    kind, _, value = load.partition("=")
    return (kind, float("inf") if value == "inf" else float(value or 0))


def _dense(budgets: list[int]) -> list[float]:
    lo, hi = min(budgets), max(budgets)
    steps = 60
    return [lo * (hi / lo) ** (i / steps) for i in range(steps + 1)] if hi > lo else [lo]
