"""Does ``text_relevance`` find the question's objects? What its score sees on a bundled trained model.

``python lab/benchmarks/text_alignment.py [--model tiny-llava|tiny-qwen2-vl|tiny-qwen2.5-vl] [--images 30]
[--questions 3] [--keep 0.333] [--out PATH]``

``text_relevance`` scores each visual token by its largest cosine similarity to the query's token embeddings (the
LM's input embeddings; the image tokens are in the same space, after the projector / merger). That is only a
relevance signal if image tokens of an object lie near the embeddings of the words naming it. This script measures
it on test images of the synthetic task (docs/dataset.md), with the query the integration builds from the model's
own chat prompt (``settings.query_ids``; on Qwen the user turn, ``user_turn_ids``) and the library method itself
selecting ``--keep`` of the tokens:

* ``object rate``: the share of object tokens (a token is an object's when more than 10 % of its pixels belong to
  one, from the scene's label map) among the kept tokens, over the image's own share (1.0 = a random selection's);
  per question type;
* the query tokens that are the best match of most image tokens, and the range of the largest similarities.

Writes ``OUT.json`` and ``OUT.md`` (default ``lab/results/text-alignment-<model>``).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "lab"
for _path in (LAB, REPO):  # tokcomp_lab from lab/; vllm_tokcomp and lab.benchmarks from the repo root
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from vllm_tokcomp.bench.common import output_file  # noqa: E402

RESULTS = LAB / "results"
OBJECT_SHARE = 0.1  # a token is an object's when more than this share of its pixels belong to one


class ImageTokens:
    """A bundled trained model's image tokens in its LM input space, and its chat prompt's query ids."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        import transformers
        from transformers import AutoProcessor

        config = json.loads((model_dir / "config.json").read_text())
        self.qwen = config["model_type"] in ("qwen2_vl", "qwen2_5_vl")
        self.processor = AutoProcessor.from_pretrained(str(model_dir))
        self.model = getattr(transformers, config["architectures"][0]).from_pretrained(
            str(model_dir), dtype=torch.float32).eval()
        tokenizer = self.processor.tokenizer
        self.excluded = {config.get("image_token_id", config.get("image_token_index")),
                         config.get("video_token_id"), *tokenizer.all_special_ids} - {None}

    def __call__(self, image, question: str):  # noqa: ANN001, ANN204 - PIL image; returns (tokens, grid, query ids)
        import torch

        from vllm_tokcomp.integration.settings import query_ids

        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        if self.qwen:
            from vllm_tokcomp.integration.text_signals import user_turn_ids

            ids = user_turn_ids(ids, self.processor.tokenizer)
        with torch.no_grad():
            kwargs = {"image_grid_thw": inputs["image_grid_thw"]} if self.qwen else {}
            out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"], **kwargs)
            features = out.pooler_output if hasattr(out, "pooler_output") else out
            features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features.flatten(0, -2)
        if self.qwen:
            _, h, w = (int(v) // m for v, m in zip(inputs["image_grid_thw"][0].tolist(), (1, 2, 2), strict=True))
        else:
            h = w = int(features.shape[0] ** 0.5)
        return features, (h, w), query_ids(ids, self.excluded)


def object_tokens(scene, grid: tuple[int, int]):  # noqa: ANN001, ANN201 - Scene; numpy bool [h * w]
    from vllm_tokcomp.data.synth import label_map

    labels = label_map(scene)
    h, w = grid
    ph, pw = labels.shape[0] // h, labels.shape[1] // w
    cells = labels[: h * ph, : w * pw].reshape(h, ph, w, pw).transpose(0, 2, 1, 3).reshape(h * w, -1)
    return (cells > 0).mean(1) > OBJECT_SHARE


def measure(model_dir: Path, images: int, questions: int, keep: float, seed: int = 0) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from vllm_tokcomp.data.generate import scene_rng
    from vllm_tokcomp.data.synth import make_questions, make_scene, render_scene
    from vllm_tokcomp.methods import get_method
    from vllm_tokcomp.methods.base import VisualTokens

    encoder = ImageTokens(model_dir)
    embed = encoder.model.get_input_embeddings()
    method = get_method("text_relevance")
    rates: dict[str, list[float]] = collections.defaultdict(list)
    best = collections.Counter()
    top_similarity = []
    example = None
    for index in range(images):
        rng = scene_rng(seed, "test", index)
        scene = make_scene(rng)
        image = render_scene(scene)
        for qa in make_questions(scene, rng, questions):
            features, grid, query = encoder(image, qa["question"])
            is_object = object_tokens(scene, grid)
            if example is None:
                example = {"question": qa["question"], "query": encoder.processor.tokenizer.decode(query)}
            with torch.no_grad():
                text = embed(torch.tensor(query))
                result = method(VisualTokens(features=features, grid=grid, text_embeds=text),
                                max(1, round(keep * features.shape[0])))
                similarity = F.normalize(features, dim=-1) @ F.normalize(text, dim=-1).T
            kept = result.assignment.kept_mask().numpy()
            rate = float(is_object[kept].mean() / max(is_object.mean(), 1e-6))
            rates[qa["type"]].append(rate)
            rates["all"].append(rate)
            best.update(encoder.processor.tokenizer.convert_ids_to_tokens(
                [query[j] for j in similarity.argmax(1).tolist()]))
            top_similarity.append(similarity.amax(1))
    spread = torch.cat(top_similarity)
    total = sum(best.values())
    return {
        "example_query": example,
        "object_rate": {t: round(float(np.mean(v)), 3) for t, v in sorted(rates.items())},
        "questions": {t: len(v) for t, v in sorted(rates.items())},
        "best_matching_query_tokens": [[token, round(n / total, 3)] for token, n in best.most_common(8)],
        "max_similarity": {"min": round(spread.min().item(), 3), "median": round(spread.median().item(), 3),
                           "max": round(spread.max().item(), 3)},
    }


def markdown(report: dict) -> str:
    rates = report["object_rate"]
    types = [t for t in rates if t != "all"]
    lines = [
        f"# text_relevance's selection on {report['model_name']}",
        "",
        f"{report['images']} test images x {report['questions_per_image']} questions, "
        f"{report['keep']:.0%} of the tokens kept by the library's `text_relevance` with the integration's query.",
        "Object rate: share of object tokens among the kept over the image's own share (1.0 = random selection).",
        "",
        "| all | " + " | ".join(types) + " |",
        "|---:|" + "---:|" * len(types),
        f"| {rates['all']:.2f} | " + " | ".join(f"{rates[t]:.2f}" for t in types) + " |",
        "",
        "Best-matching query token of the image tokens: "
        + ", ".join(f"`{t}` {share:.0%}" for t, share in report["best_matching_query_tokens"][:5]) + ".",
        "Largest cosine similarity of an image token to the query (min / median / max): "
        + " / ".join(f"{report['max_similarity'][k]:.3f}" for k in ("min", "median", "max")) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    import torch

    from vllm_tokcomp.cli import BUNDLED_MODELS, bundled_model_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llava", choices=BUNDLED_MODELS)
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--questions", type=int, default=3, help="questions per image")
    parser.add_argument("--keep", type=float, default=1 / 3, help="share of the image's tokens kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not 0 < args.keep < 1:
        parser.error("--keep must be in (0, 1)")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model_dir = bundled_model_dir(args.model, build=True)
    report = {"model_name": args.model, "model": str(model_dir), "images": args.images,
              "questions_per_image": args.questions, "keep": args.keep,
              **measure(model_dir, args.images, args.questions, args.keep),
              "seconds": round(time.perf_counter() - started, 1)}
    out = args.out or RESULTS / f"text-alignment-{args.model}"
    out.parent.mkdir(parents=True, exist_ok=True)
    output_file(out, ".json").write_text(json.dumps(report, indent=2) + "\n")
    output_file(out, ".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
