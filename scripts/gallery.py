"""The docs gallery: what every method keeps of two synthetic VQA scenes at 64 and 16 tokens, on the bundled tiny LLaVA.

    .venv/bin/python scripts/gallery.py            # writes docs/gallery/*.png
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from vllm_tokcomp.data.synth import make_scene, render_scene  # noqa: E402
from vllm_tokcomp.methods import available_methods  # noqa: E402
from vllm_tokcomp.show import LlavaViewer, draw, panel_grid  # noqa: E402
from vllm_tokcomp.tiny.llava_builder import ensure_default_model  # noqa: E402

SCENES = {"scene-a": (3, "How many squares are there?"), "scene-b": (11, "What colour is the circle?")}
BUDGETS = (64, 16)


def main() -> None:
    out = ROOT / "docs" / "gallery"
    out.mkdir(parents=True, exist_ok=True)
    viewer = LlavaViewer(ensure_default_model())
    for name, (seed, question) in SCENES.items():
        image = render_scene(make_scene(np.random.default_rng(seed)))
        for budget in BUDGETS:
            panels = [(f"{method} @ {budget}", draw(viewer.select(image, method, budget, question)))
                      for method in available_methods()]
            path = out / f"{name}-{budget}.png"
            panel_grid(panels, columns=6).save(path)
            print(f"wrote {path} ({question!r})")


if __name__ == "__main__":
    main()
