"""The main job: serve the bundled tiny LLaVA with compression on, ask image questions, show the saving.

Starts the real ``tokcomp serve`` (vLLM's OpenAI server with the plugin) on the bundled model trained on the
synthetic VQA task (docs/dataset.md), sends a few test-split questions as base64 images through the ``openai``
client, each twice (server default compression, then ``tokcomp_method: none`` per request), and prints both
answers next to the right one and the saving: image tokens, prompt tokens and KV blocks.

    python scripts/demo.py [--method tome] [--budget 64] [--questions 4] [MODEL]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
from pathlib import Path

from openai import OpenAI
from PIL import Image

from vllm_tokcomp.integration.kv_probe import LOG_ENV, SCHEDULER_CLS
from vllm_tokcomp.launch import ServerProcess


def demo_questions(n: int) -> list[tuple[Image.Image, dict]]:
    """The first ``n`` questions of the synthetic test split (seed 0), one per image, with their images."""
    from vllm_tokcomp.data.generate import scene_rng
    from vllm_tokcomp.data.synth import make_questions, make_scene, render_scene

    out = []
    for index in range(n):
        rng = scene_rng(0, "test", index)
        scene = make_scene(rng)
        out.append((render_scene(scene), make_questions(scene, rng, 2)[0]))
    return out


def image_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="HF-format LLaVA dir (default: the bundled tiny model)")
    parser.add_argument("--method", default="tome")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--questions", type=int, default=4, help="test-split questions to ask")
    args = parser.parse_args()

    serve_args = [*([args.model] if args.model else []), "--method", args.method, "--budget", str(args.budget)]
    serve_args += ["--max-model-len", "2048", "--served-model-name", "tiny-llava"]
    print(f"starting: tokcomp serve {' '.join(serve_args)}", flush=True)
    # The KV blocks shown are read from inside the engine (one JSON line per finished request).
    kv_log = Path(tempfile.mkdtemp(prefix="tokcomp-demo-")) / "kv.jsonl"
    serve_args += ["--scheduler-cls", SCHEDULER_CLS]
    with ServerProcess(serve_args, env={LOG_ENV: str(kv_log)}) as server:
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")

        def ask(image: Image.Image, question: str, mm_kwargs: dict | None):
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(image)}},
                                                     {"type": "text", "text": question}]}]
            extra = {"mm_processor_kwargs": mm_kwargs} if mm_kwargs else None
            return client.chat.completions.create(
                model="tiny-llava", messages=messages, max_tokens=8, temperature=0.0, extra_body=extra
            )

        print(f"\n{'question':48s}{'right':>9s}{'compressed':>12s}{'plain':>10s}")
        replies = []
        for image, qa in demo_questions(args.questions):
            compressed, plain = ask(image, qa["question"], None), ask(image, qa["question"], {"tokcomp_method": "none"})
            replies.append((compressed, plain))
            print(f"{qa['question']:48s} {qa['answer']:>8s} {compressed.choices[0].message.content.strip():>11s}"
                  f" {plain.choices[0].message.content.strip():>9s}")

    # One JSON line per finished request, in order: (compressed, plain) for each question.
    kv = [json.loads(line) for line in kv_log.read_text().splitlines()]
    compressed, plain = replies[0]
    kv_compressed, kv_plain = kv[0], kv[1]
    full_prompt, small_prompt = plain.usage.prompt_tokens, compressed.usage.prompt_tokens
    text_tokens = full_prompt - 576
    rows = [
        ("image tokens", 576, small_prompt - text_tokens),
        ("prompt tokens", full_prompt, small_prompt),
        (f"KV blocks held (block size {kv_plain['block_size']})", kv_plain["max_blocks"], kv_compressed["max_blocks"]),
    ]
    print(f"\nfirst question, {args.method} at budget {args.budget}:")
    print(f"{'':32s}{'uncompressed':>14s}{'compressed':>12s}{'saving':>9s}")
    for name, before, after in rows:
        print(f"{name:32s}{before:>14d}{after:>12d}{1 - after / before:>9.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
