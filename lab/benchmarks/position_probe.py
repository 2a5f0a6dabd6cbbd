"""Do the patch features the projector reads still say where each patch is? A linear probe, per model.

``python lab/benchmarks/position_probe.py [--model DIR ...] [--images 120] [--out PATH]``

For each model folder (default: the bundled trained tiny LLaVA), the vision tower's feature-layer outputs of
``--images`` generated training scenes (a split no test question comes from) are probed linearly, as raw tower
features and after the projector: which half of the image a patch is in (left/right) and its column (24 ways).
A probe is fitted on three quarters of the images and scored on the rest, over all patches and over the
patches on an object or the digit box (the ones questions are about). Chance is 0.5 and 1/24.

This is the measurement behind ``train.llava --position-weight``: a model trained without it answered "left" to
every "left or right?" test question, and its object patches told left from right at 0.61.

Writes ``OUT.json`` and ``OUT.md`` (default ``lab/results/position-probe``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "lab"
for _path in (LAB, REPO):  # tokcomp_lab from lab/; vllm_tokcomp and lab.benchmarks from the repo root
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from vllm_tokcomp.bench.accuracy import model_or_default  # noqa: E402
from vllm_tokcomp.bench.common import output_file  # noqa: E402

DEFAULT_OUT = LAB / "results" / "position-probe"
GRID = 24
FIRST_SCENE = 90_000_000  # training-split scene indices far beyond any run's steps


def features(model_dir: str, images: int):  # noqa: ANN201 - (tower [N, 576, D], projected [N, 576, E], occupied)
    import torch
    from transformers import LlavaForConditionalGeneration

    from tokcomp_lab.train.llava import patch_owners, pixels
    from vllm_tokcomp.data.generate import scene_rng
    from vllm_tokcomp.data.synth import make_scene, render_scene

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    layer = model.config.vision_feature_layer
    tower, projected, occupied = [], [], []
    with torch.no_grad():
        for i in range(images):
            scene = make_scene(scene_rng(0, "train", FIRST_SCENE + i))
            out = model.model.vision_tower(pixel_values=pixels(render_scene(scene))[None], output_hidden_states=True)
            patch = out.hidden_states[layer][0, 1:]
            tower.append(patch)
            projected.append(model.model.multi_modal_projector(patch))
            occupied.append(torch.from_numpy(patch_owners(scene) > 0))
    return torch.stack(tower), torch.stack(projected), torch.stack(occupied)


def fit_linear(train_x, train_y, steps: int = 300):  # noqa: ANN001, ANN201 - torch [M, D], [M] -> classifier
    """Multinomial logistic regression on standardised ``train_x``; returns ``[..., D] -> [...]`` predicted classes."""
    import torch
    import torch.nn.functional as F

    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    x = (train_x - mean) / std
    classes = int(train_y.max()) + 1
    torch.manual_seed(0)
    w = torch.zeros(x.shape[-1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(x @ w + b, train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w, b = w.detach(), b.detach()
    return lambda features: (((features - mean) / std) @ w + b).argmax(-1)


def probe(x, y, occupied, steps: int = 300) -> dict[str, float]:  # noqa: ANN001 - torch tensors [N, 576, ...]
    """Multinomial logistic regression on the first 3/4 of the images, accuracy on the rest."""
    import torch

    n = x.shape[0] * 3 // 4
    classify = fit_linear(x[:n].reshape(-1, x.shape[-1]), y[:n].reshape(-1), steps)
    with torch.no_grad():
        right = classify(x[n:]) == y[n:]
    return {"all_patches": round(right.float().mean().item(), 3),
            "object_patches": round(right[occupied[n:]].float().mean().item(), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None, help="model folder (repeat for several)")
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    import torch

    t0 = time.perf_counter()
    models = args.model or [model_or_default(None)]
    column = (torch.arange(GRID * GRID) % GRID)[None].expand(args.images, -1)
    results = {}
    for model_dir in models:
        tower, projected, occupied = features(model_dir, args.images)
        results[model_dir] = {
            name: {"left_right": probe(x, (column >= GRID // 2).long(), occupied), "column": probe(x, column, occupied)}
            for name, x in (("tower", tower), ("projected", projected))
        }
    report = {"images": args.images, "chance": {"left_right": 0.5, "column": round(1 / GRID, 3)},
              "models": results, "seconds": round(time.perf_counter() - t0, 1)}
    lines = [f"# Where is each patch? Linear probes on the feature-layer patches ({args.images} scenes)", "",
             "Fitted on 3/4 of the scenes, scored on the rest; chance 0.50 (left/right) and 0.04 (column).", "",
             "| model | features | left/right, all | left/right, objects | column, all | column, objects |",
             "|---|---|---:|---:|---:|---:|"]
    for model_dir, per in results.items():
        for name, r in per.items():
            lines.append(f"| {Path(model_dir).name} | {name} | {r['left_right']['all_patches']:.3f} | "
                         f"{r['left_right']['object_patches']:.3f} | {r['column']['all_patches']:.3f} | "
                         f"{r['column']['object_patches']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    output_file(args.out, ".json").write_text(json.dumps(report, indent=1) + "\n")
    text = "\n".join(lines) + "\n"
    output_file(args.out, ".md").write_text(text)
    print(text + f"\nwrote {args.out}.json and .md ({report['seconds']}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
