"""How close the processing-time ``auto`` budget comes to MustDrop's threshold form.

vLLM needs every image's token count before the vision tower runs, so ``tokcomp_budget: "auto"``
estimates MustDrop's stage-1 savings from the pixels (``vllm_tokcomp.auto_budget``). The
published method instead merges every 3x3 window of *layer-1 features* whose mean pairwise cosine
similarity reaches the threshold, a count known only after the first ViT layer. This script runs both
on the same images: the pixel estimate, and the threshold form (``MustDropStage1.compress_adaptive``)
on the output of the first layer of a real CLIP tower (default: the bundled trained tiny model, loaded
with transformers), and reports the counts per background type, their differences and correlation.

    .venv/bin/python lab/benchmarks/mustdrop_auto.py [--model DIR] [--images 200] [--out OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "lab"
for _path in (LAB, ROOT):  # tokcomp_lab from lab/; vllm_tokcomp and lab.benchmarks from the repo root
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from vllm_tokcomp.auto_budget import ESTIMATORS, adaptive_budget  # noqa: E402
from vllm_tokcomp.bench import common  # noqa: E402
from vllm_tokcomp.data.generate import scene_rng  # noqa: E402
from vllm_tokcomp.data.synth import make_scene, render_scene  # noqa: E402
from vllm_tokcomp.methods import VisualTokens  # noqa: E402
from vllm_tokcomp.methods.mustdrop_stages import MustDropStage1  # noqa: E402

FULL = 576


def counts_for_image(image, processor, tower, *, threshold: float, window: int) -> tuple[dict, int]:  # noqa: ANN001
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    auto = {name: adaptive_budget(pixels[0], FULL, threshold=threshold, window=window, estimator=name)
            for name in ESTIMATORS}
    with torch.no_grad():
        hidden = tower(pixel_values=pixels.to(tower.dtype), output_hidden_states=True).hidden_states[1]
    patches = hidden[0, 1:].float()  # output of the first layer, CLS dropped
    grid = int(patches.shape[0] ** 0.5)
    tokens = VisualTokens(patches, (grid, grid), cls_attention=torch.zeros(patches.shape[0]))
    stage1 = MustDropStage1(threshold=threshold, window=window, key_ratio=0.0)  # as inside vLLM's tower
    return auto, stage1.compress_adaptive(tokens).features.shape[0]


def pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return None
    return statistics.correlation(xs, ys)


def summarise(rows: list[dict], estimator: str) -> dict:
    auto = [r["auto"][estimator] for r in rows]
    thr = [r["threshold_form"] for r in rows]
    diff = [a - t for a, t in zip(auto, thr, strict=True)]
    return {
        "images": len(rows),
        "auto_mean": statistics.fmean(auto),
        "threshold_form_mean": statistics.fmean(thr),
        "mean_difference": statistics.fmean(diff),
        "mean_abs_difference": statistics.fmean(abs(d) for d in diff),
        "within_10_percent": sum(abs(d) <= 0.1 * t for d, t in zip(diff, thr, strict=True)) / len(rows),
        "pearson": pearson(auto, thr),
    }


def markdown(result: dict) -> str:
    lines = [
        f"Model `{result['model_name']}`, {result['images']} test-split images, threshold {result['threshold']}, "
        f"window {result['window']}. Tokens kept of 576 (lower = more merged).",
        "",
        "| images | n | estimator | auto (pixels) mean | threshold form (layer-1 features) mean "
        "| auto - threshold | mean abs diff | within 10 % | Pearson r |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_estimator in result["summary"].items():
        for estimator, s in by_estimator.items():
            r = "n/a" if s["pearson"] is None else f"{s['pearson']:.2f}"
            lines.append(
                f"| {name} | {s['images']} | {estimator} | {s['auto_mean']:.1f} | {s['threshold_form_mean']:.1f} "
                f"| {s['mean_difference']:+.1f} | {s['mean_abs_difference']:.1f} | {s['within_10_percent']:.0%} "
                f"| {r} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="LLaVA model directory (default: the bundled trained tiny model)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="data seed (test split of the synthetic task)")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--out", type=Path, default=LAB / "results" / "mustdrop_auto.json")
    args = parser.parse_args(argv)

    from tqdm import tqdm
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vllm_tokcomp.tiny import llava_builder as tiny

    model_dir = Path(args.model) if args.model else tiny.ensure_trained_model()
    processor = AutoProcessor.from_pretrained(model_dir)
    tower = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).model.vision_tower.eval()
    rows = []
    for index in tqdm(range(args.images), desc="images"):
        scene = make_scene(scene_rng(args.seed, "test", index))
        auto, thr = counts_for_image(render_scene(scene), processor, tower, threshold=args.threshold,
                                     window=args.window)
        rows.append({"index": index, "background": scene.background, "auto": auto, "threshold_form": thr})
    groups = defaultdict(list)
    for row in rows:
        groups[row["background"]].append(row)
    summary = {name: {e: summarise(group, e) for e in ESTIMATORS}
               for name, group in [("all", rows), *sorted(groups.items())]}
    result = {
        "benchmark": "mustdrop_auto",
        "created": common.timestamp(),
        "model": str(model_dir),
        "model_name": model_dir.name,
        "images": args.images,
        "threshold": args.threshold,
        "window": args.window,
        "summary": summary,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
