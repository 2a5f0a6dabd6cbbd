"""The main job: serve the bundled tiny LLaVA with compression on, ask one image question, show the saving.

Starts the real ``tokcomp serve`` (vLLM's OpenAI server with the plugin), sends
the same base64 image question twice through the ``openai`` client (server
default compression, then ``tokcomp_method: none`` per request), and prints the
answer and the saving: image tokens, prompt tokens and KV blocks.

    python scripts/demo.py [--method tome] [--budget 64] [MODEL]
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
from PIL import Image, ImageDraw

from vllm_tokcomp.integration.kv_probe import LOG_ENV, SCHEDULER_CLS
from vllm_tokcomp.launch import ServerProcess


def demo_image() -> Image.Image:
    image = Image.new("RGB", (336, 336), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 60, 140, 160), fill="red")
    draw.rectangle((200, 180, 300, 280), fill="blue")
    return image


def image_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="HF-format LLaVA dir (default: the bundled tiny model)")
    parser.add_argument("--method", default="tome")
    parser.add_argument("--budget", type=int, default=64)
    args = parser.parse_args()

    serve_args = [*([args.model] if args.model else []), "--method", args.method, "--budget", str(args.budget)]
    serve_args += ["--max-model-len", "2048", "--served-model-name", "tiny-llava"]
    print(f"starting: tokcomp serve {' '.join(serve_args)}", flush=True)
    # The KV blocks shown are read from inside the engine (one JSON line per finished request).
    kv_log = Path(tempfile.mkdtemp(prefix="tokcomp-demo-")) / "kv.jsonl"
    serve_args += ["--scheduler-cls", SCHEDULER_CLS]
    with ServerProcess(serve_args, env={LOG_ENV: str(kv_log)}) as server:
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url(demo_image())}},
                    {"type": "text", "text": "What colour is the circle?"},
                ],
            }
        ]

        def ask(mm_kwargs: dict | None):
            extra = {"mm_processor_kwargs": mm_kwargs} if mm_kwargs else None
            return client.chat.completions.create(
                model="tiny-llava", messages=messages, max_tokens=16, temperature=0.0, extra_body=extra
            )

        compressed = ask(None)
        plain = ask({"tokcomp_method": "none"})

    kv_compressed, kv_plain = (json.loads(line) for line in kv_log.read_text().splitlines())
    full_prompt, small_prompt = plain.usage.prompt_tokens, compressed.usage.prompt_tokens
    text_tokens = full_prompt - 576
    rows = [
        ("image tokens", 576, small_prompt - text_tokens),
        ("prompt tokens", full_prompt, small_prompt),
        (f"KV blocks held (block size {kv_plain['block_size']})", kv_plain["max_blocks"], kv_compressed["max_blocks"]),
    ]
    print(f"\nanswer ({args.method}, budget {args.budget}): {compressed.choices[0].message.content!r}")
    print(f"answer (uncompressed):         {plain.choices[0].message.content!r}\n")
    print(f"{'':32s}{'uncompressed':>14s}{'compressed':>12s}{'saving':>9s}")
    for name, before, after in rows:
        print(f"{name:32s}{before:>14d}{after:>12d}{1 - after / before:>9.0%}")
    print("\n(the bundled tiny model has random weights until the trained one lands: answers are not meaningful)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
