"""Cost of every registered compressor per image, next to one CLIP-L-sized vision-encoder forward.

Not a test: prints a table and writes JSON. Synthetic inputs at LLaVA-1.5 scale: N = 576
patch tokens (24 x 24), D = 1024, keys of width 1024, a 32-token text query. The encoder
reference is 24 pre-norm transformer layers of width 1024 (16 heads, MLP 4096) on 577
tokens, built from plain torch modules with random weights (CLIP ViT-L/14-336's shape).

    .venv/bin/python benchmarks/method_cost.py [--out benchmarks/results/method_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vllm_tokcomp.bench.common import RESULTS_DIR, provenance, provenance_line  # noqa: E402
from vllm_tokcomp.methods import VisualTokens, available_methods, get_method, method_class  # noqa: E402
from vllm_tokcomp.methods.learned import (  # noqa: E402
    CAbstractor,
    LlamaVidCompressor,
    PixelUnshuffleMLP,
    QFormerResampler,
)


def synthetic_tokens(n_side: int = 24, dim: int = 1024, text_len: int = 32, seed: int = 0) -> VisualTokens:
    g = torch.Generator().manual_seed(seed)
    n = n_side * n_side
    return VisualTokens(
        features=torch.randn(n, dim, generator=g),
        grid=(n_side, n_side),
        cls_attention=torch.softmax(4 * torch.randn(n, generator=g), 0),
        layer_cls_attention=torch.softmax(4 * torch.randn(23, n, generator=g), 1),  # CLIP-L up to its layer -2
        keys=torch.randn(n, dim, generator=g),
        text_embeds=torch.randn(text_len, dim, generator=g),
        text_attention=torch.softmax(4 * torch.randn(text_len, n, generator=g), 1),
    )


def clip_l_encoder(layers: int = 24, width: int = 1024, heads: int = 16) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        width, heads, dim_feedforward=4 * width, activation="gelu", batch_first=True, norm_first=True, dropout=0.0
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


def median_ms(fn, runs: int, warmup: int = 1) -> tuple[float, list[float]]:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "method_cost.json"))
    parser.add_argument("--budget", type=int, default=144, help="output tokens per image (default 144 = 25%%)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per method (median reported)")
    parser.add_argument("--encoder-runs", type=int, default=3, help="timed encoder forwards (median reported)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    tokens = synthetic_tokens()
    rows = []
    for name in available_methods():
        method = get_method(name)
        ms, times = median_ms(lambda method=method: method(tokens, args.budget), args.runs)
        rows.append({"method": name, "family": method_class(name).family, "median_ms": ms, "runs_ms": times})
        if method_class(name).adaptive:
            count = method.compress_adaptive(tokens).num_tokens
            ms, times = median_ms(lambda method=method: method.compress_adaptive(tokens), args.runs)
            rows.append(
                {
                    "method": f"{name} (adaptive, {count} tokens)",
                    "family": method_class(name).family,
                    "median_ms": ms,
                    "runs_ms": times,
                }
            )

    torch.manual_seed(0)
    learned = {
        "qformer (32 queries, 2 blocks)": QFormerResampler(1024, 4096, num_queries=32, num_heads=16, depth=2),
        "pixel_unshuffle (2x2 -> 144)": PixelUnshuffleMLP(1024, 4096, factor=2),
        "c_abstractor (12x12)": CAbstractor(1024, 4096, out_grid=(12, 12), depth=1),
        "llama_vid (2 tokens)": LlamaVidCompressor(1024, 4096),
    }
    for label, module in learned.items():
        module.eval()
        ms, times = median_ms(lambda module=module: module(tokens), args.runs)
        rows.append({"method": label, "family": "learned", "median_ms": ms, "runs_ms": times})

    encoder = clip_l_encoder()
    pixels = torch.randn(1, 577, 1024)
    encoder_ms, encoder_times = median_ms(lambda: encoder(pixels), args.encoder_runs)
    for row in rows:
        row["fraction_of_encoder"] = row["median_ms"] / encoder_ms

    load_after = os.getloadavg()
    print(f"threads={args.threads}  N=576  D=1024  budget={args.budget}  torch {torch.__version__}")
    print(f"1-min load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'method':44s} {'family':15s} {'median ms':>10s} {'min ms':>9s} {'% of encoder':>13s}")
    for row in rows:
        pct = 100 * row["fraction_of_encoder"]
        print(
            f"{row['method']:44s} {row['family']:15s} {row['median_ms']:10.2f} {min(row['runs_ms']):9.2f} {pct:12.2f}%"
        )
    label = "CLIP-L encoder forward (24 x 1024, 577 tok)"
    print(f"{label:44s} {'reference':15s} {encoder_ms:10.1f} {min(encoder_times):9.1f} {100:12.2f}%")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "provenance": provenance(),
        "setting": {"tokens": 576, "grid": [24, 24], "dim": 1024, "key_dim": 1024, "text_tokens": 32},
        "budget": args.budget,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "load_average_before_after": [load_before[0], load_after[0]],
        "encoder": {"layers": 24, "width": 1024, "tokens": 577, "median_ms": encoder_ms, "runs_ms": encoder_times},
        "methods": rows,
    }
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md').name}")
    return 0


def markdown(report: dict) -> str:
    """The report as a markdown table: per method its median and fastest time and its share of one encoder
    forward."""
    setting = report["setting"]
    encoder = report["encoder"]
    lines = [
        f"# Method cost per image (N = {setting['tokens']}, D = {setting['dim']}, budget {report['budget']}, "
        f"{report['threads']} thread(s))",
        "",
        provenance_line(report.get("provenance")) + f" 1-min load average {report['load_average_before_after'][0]:.2f}"
        f" → {report['load_average_before_after'][1]:.2f}.",
        "",
        "| method | family | median ms | min ms | % of one encoder forward |",
        "|---|---|---:|---:|---:|",
    ]
    for row in report["methods"]:
        lines.append(f"| {row['method']} | {row['family']} | {row['median_ms']:.2f} | {min(row['runs_ms']):.2f} | "
                     f"{100 * row['fraction_of_encoder']:.2f}% |")
    lines.append(f"| CLIP-L-sized encoder forward ({encoder['layers']} x {encoder['width']}, {encoder['tokens']} "
                 f"tokens) | reference | {encoder['median_ms']:.1f} | {min(encoder['runs_ms']):.1f} | 100% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
