"""LLaVA-1.5-7B's geometry on one GPU, outside vLLM: encoder, compression, prefill and KV-bound requests/s.

Why outside vLLM: the GPU machines this project can borrow have torch and transformers but no vLLM (and vLLM
0.32 needs another torch), and nothing can be downloaded there. So this script builds the published geometry from
transformers' own classes with dummy bf16 weights made on the GPU: CLIP ViT-L/14 at 336 px (23 of 24 layers, as
LLaVA reads layer -2), LLaVA's two-layer MLP projector, and a 32-layer, 4096-wide Llama-2-7B. Weights are random,
so answers are meaningless; timings and memory are those of the real shapes. Only torch, transformers and this
library's pure-torch methods are imported.

Per arm (``plain``, and every method x budget):

- ``encoder_ms_per_image``: the tower (plus projector) on a batch of images; MustDrop runs its stage 1 inside the
  tower (after layer 0, per image, as the served path does), so its encoder time is its own;
- ``method_ms_per_image``: the compression call per image with the signals it reads ([CLS] attention, keys, the
  text); ``probe_ms_per_image``: MustDrop's LM probe (the LM's first three layers over image + text);
- ``prefill_ms``: one request's prefill at text + image tokens;
- ``requests_per_s``: a fixed workload (``--requests`` single-image requests, ``--text-tokens`` text tokens,
  ``--output-tokens`` greedy tokens each) under a fixed KV-cache budget (``--kv-gib``): each wave admits as many
  requests as their full KV (prompt + output) fits, encodes and compresses their images, prefills them in one
  batch and decodes with a real KV cache (transformers' ``DynamicCache``); the time of all waves, end to end.

Static waves and eager decoding are simpler than vLLM's continuous batching and CUDA graphs, so absolute numbers
are lower than vLLM's; the ratios between arms come from the same loop on the same card.

    python benchmarks/gpu_llava.py                                  # on the GPU: JSON + markdown (+ plot)
    python benchmarks/gpu_llava.py --geometry tiny --requests 8     # CPU smoke run (what CI runs)
    python benchmarks/gpu_llava.py --plot benchmarks/results/gpu-llava-1.5-7b.json   # plot an existing JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vllm_tokcomp.bench.common import RESULTS_DIR, machine_info, timestamp  # noqa: E402
from vllm_tokcomp.hf_signals import GRID, encode, encode_with_stage1, probe_text_attention  # noqa: E402
from vllm_tokcomp.integration.clip_signals import VisionSignals  # noqa: E402
from vllm_tokcomp.methods import VisualTokens, get_method  # noqa: E402
from vllm_tokcomp.methods.mustdrop_stages import MustDropStage1  # noqa: E402

SCHEMA_VERSION = 1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Geometry:
    vision_width: int
    vision_mlp: int
    vision_layers: int  # instantiated layers: LLaVA reads the output of layer -2 of 24
    vision_heads: int
    text_width: int
    text_mlp: int
    text_layers: int
    text_heads: int
    vocab: int


GEOMETRIES = {
    # llava-hf/llava-1.5-7b-hf's config.json: CLIP ViT-L/14-336 and Llama-2-7B (vocab 32064 with the image token).
    "llava-1.5-7b": Geometry(1024, 4096, 23, 16, 4096, 11008, 32, 32, 32064),
    "tiny": Geometry(64, 128, 3, 4, 64, 128, 4, 4, 1000),
}


def build(geometry: Geometry, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(vision tower, projector, LM) with random weights made directly on ``device`` in ``dtype``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    vision = CLIPVisionConfig(hidden_size=geometry.vision_width, intermediate_size=geometry.vision_mlp,
                              num_hidden_layers=geometry.vision_layers, num_attention_heads=geometry.vision_heads,
                              image_size=336, patch_size=14, projection_dim=768, attn_implementation="sdpa")
    text = LlamaConfig(hidden_size=geometry.text_width, intermediate_size=geometry.text_mlp,
                       num_hidden_layers=geometry.text_layers, num_attention_heads=geometry.text_heads,
                       num_key_value_heads=geometry.text_heads, vocab_size=geometry.vocab,
                       max_position_embeddings=4096, attn_implementation="sdpa")
    with _default_dtype(dtype), torch.device(device):
        tower = CLIPVisionModel(vision).eval()
        projector = nn.Sequential(nn.Linear(geometry.vision_width, geometry.text_width), nn.GELU(),
                                  nn.Linear(geometry.text_width, geometry.text_width)).eval()
        lm = LlamaForCausalLM(text).eval()
    return tower, projector, lm


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def synthetic_images(count: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[count, 3, 336, 336]`` CLIP-normalised scenes: a flat background and 2-5 flat rectangles each."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.empty(count, 3, 336, 336)
    for image in images:
        image[:] = torch.rand(3, 1, 1, generator=generator)
        for _ in range(int(torch.randint(2, 6, (1,), generator=generator))):
            top, left = (int(v) for v in torch.randint(0, 256, (2,), generator=generator))
            height, width = (int(v) for v in torch.randint(30, 120, (2,), generator=generator))
            image[:, top:top + height, left:left + width] = torch.rand(3, 1, 1, generator=generator)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return ((images - mean) / std).to(device=device, dtype=dtype)


def kv_bytes_per_token(lm: nn.Module) -> int:
    config = lm.config
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * lm.dtype.itemsize


class Clock:
    """Wall time of a region, with the device synchronised on both sides."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def time(self, into: list[float]):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        into.append(time.perf_counter() - start)


def compress(name: str, budget: int, features: Tensor, signals: VisionSignals, text: Tensor,
             text_attention: Tensor | None = None, sizes: Tensor | None = None) -> Tensor:
    """The library's method on one image's tokens with the signals the served LLaVA path hands it."""
    grid = GRID if sizes is None else (features.shape[0],)
    tokens = VisualTokens(features=features, grid=grid, cls_attention=signals.cls_attention, keys=signals.keys,
                          key_heads=signals.key_heads, text_embeds=text, text_attention=text_attention, sizes=sizes,
                          layer_cls_attention=None if sizes is not None else signals.layer_cls_attention)
    method = get_method(name, stage1=False) if name == "mustdrop" else get_method(name)
    return method(tokens, budget).features


def image_tokens(lm: nn.Module, tower, projector, arm: dict, images: Tensor, text: Tensor, clock: Clock,
                 timings: dict[str, list[float]]) -> Tensor:
    """``[B, tokens, D]`` the LM's visual tokens for ``images`` under ``arm``, timing each stage into ``timings``."""
    method, budget = arm["method"], arm["budget"]
    if method == "mustdrop":
        stage1 = MustDropStage1(key_ratio=0.0)  # the published threshold and window
        outputs = []
        for image in images:
            with clock.time(timings["encoder"]):
                merged = encode_with_stage1(tower, projector, image, budget, stage1)
            features, sizes, signals = merged.features, merged.sizes, merged.signals
            timings["stage1_tokens"].append(features.shape[0])
            with clock.time(timings["probe"]):
                attention = probe_text_attention(lm.model, features, text)
            with clock.time(timings["method"]):
                outputs.append(compress(method, budget, features, signals, text, attention, sizes))
        return torch.stack(outputs)
    with clock.time(timings["encoder"]):
        features, signals = encode(tower, projector, images)
    if method is None:
        return features
    outputs = []
    for index in range(features.shape[0]):
        with clock.time(timings["method"]):
            outputs.append(compress(method, budget, features[index], signals[index], text))
    return torch.stack(outputs)


@torch.inference_mode()
def run_arm(arm: dict, models: tuple, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    tower, projector, lm = models
    clock = Clock(device)
    embed = lm.get_input_embeddings()
    generator = torch.Generator().manual_seed(0)
    text_ids = torch.randint(0, lm.config.vocab_size, (args.text_tokens,), generator=generator).to(device)
    text = embed(text_ids)
    visual = 576 if arm["budget"] is None else arm["budget"]
    per_request = kv_bytes_per_token(lm) * (args.text_tokens + visual + args.output_tokens)
    batch = max(1, min(args.requests, int(args.kv_gib * 2**30 // per_request)))
    images = synthetic_images(batch, seed=1, device=device, dtype=dtype)

    def wave(size: int, timings: dict[str, list[float]]) -> None:
        tokens = image_tokens(lm, tower, projector, arm, images[:size], text, clock, timings)
        prompt = torch.cat([tokens, text[None].expand(size, -1, -1)], dim=1)
        out = lm(inputs_embeds=prompt, use_cache=True, logits_to_keep=1)
        cache, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(args.output_tokens - 1):
            out = lm(input_ids=next_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    warm = {"encoder": [], "method": [], "probe": [], "stage1_tokens": []}
    wave(min(batch, 2), warm)  # kernels and allocator warmed on this arm's shapes
    timings: dict[str, list[float]] = {"encoder": [], "method": [], "probe": [], "stage1_tokens": []}
    waves, left, wall = 0, args.requests, []
    with clock.time(wall):
        while left > 0:
            size = min(batch, left)
            wave(size, timings)
            left -= size
            waves += 1
    prefill = []
    one = torch.cat([torch.zeros(1, visual, lm.config.hidden_size, device=device, dtype=dtype), text[None]], dim=1)
    for _ in range(args.prefill_repeats + 1):
        with clock.time(prefill):
            lm(inputs_embeds=one, use_cache=True, logits_to_keep=1)
    images_done = args.requests

    def per_image_ms(values: list[float]) -> float | None:
        return 1000 * sum(values) / images_done if values else None

    return {
        **arm,
        "image_tokens": visual,
        "requests": args.requests,
        "batch": batch,
        "waves": waves,
        "wall_s": wall[0],
        "requests_per_s": args.requests / wall[0],
        "kv_bytes_per_request": per_request,
        "encoder_ms_per_image": per_image_ms(timings["encoder"]),
        "method_ms_per_image": per_image_ms(timings["method"]),
        "probe_ms_per_image": per_image_ms(timings["probe"]),
        "prefill_ms": 1000 * statistics.median(prefill[1:]),
        # MustDrop: tokens the tower's layers 1.. ran on after the stage-1 merge (mean over images)
        "stage1_tokens": statistics.mean(timings["stage1_tokens"]) if timings["stage1_tokens"] else None,
    }


def make_arms(methods: list[str], budgets: list[int]) -> list[dict]:
    return [{"name": "plain", "method": None, "budget": None}] + [
        {"name": f"{method}@{budget}", "method": method, "budget": budget} for method in methods for budget in budgets
    ]


def add_ratios(arms: list[dict]) -> None:
    plain = next(arm for arm in arms if arm["method"] is None)
    for arm in arms:
        arm["speedup_vs_plain"] = arm["requests_per_s"] / plain["requests_per_s"]
        arm["encoder_speedup_vs_plain"] = plain["encoder_ms_per_image"] / arm["encoder_ms_per_image"]
        cost = (arm["method_ms_per_image"] or 0.0) + (arm["probe_ms_per_image"] or 0.0)
        arm["method_share_of_plain_prefill"] = cost / plain["prefill_ms"]


def markdown(data: dict) -> str:
    lines = [f"# {data['benchmark']}: {data['model']}", "",
             f"Card: {(data['machine'].get('gpu') or {}).get('name', 'none (CPU)')}; workload: "
             f"{data['config']['requests']} requests x ({data['config']['text_tokens']} text + image) tokens, "
             f"{data['config']['output_tokens']} output tokens, KV budget {data['config']['kv_gib']} GiB. "
             "Measured outside vLLM (torch + transformers, dummy weights); see benchmarks/gpu_llava.py.", "",
             "| arm | image tokens | batch | req/s | x plain | encoder ms/img | method ms/img | probe ms/img "
             "| method+probe / plain prefill | prefill ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def f(value: float | None, digits: int = 2) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    for arm in data["arms"]:
        lines.append(f"| {arm['name']} | {arm['image_tokens']} | {arm['batch']} | {f(arm['requests_per_s'])} | "
                     f"{f(arm['speedup_vs_plain'])} | {f(arm['encoder_ms_per_image'])} | "
                     f"{f(arm['method_ms_per_image'], 3)} | {f(arm['probe_ms_per_image'], 3)} | "
                     f"{f(100 * arm['method_share_of_plain_prefill'], 2)} % | {f(arm['prefill_ms'])} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    plain = next(arm for arm in data["arms"] if arm["method"] is None)
    figure, axis = plt.subplots(figsize=(6, 4))
    for method in sorted({arm["method"] for arm in data["arms"] if arm["method"]}):
        arms = sorted((arm for arm in data["arms"] if arm["method"] == method), key=lambda arm: arm["budget"])
        axis.plot([arm["budget"] for arm in arms], [arm["requests_per_s"] for arm in arms], marker="o", label=method)
    axis.axhline(plain["requests_per_s"], color="black", linestyle="--", label="plain (576)")
    axis.set_xlabel("image tokens kept")
    axis.set_ylabel("requests / s (KV-bound workload)")
    axis.set_title(f"{data['model']} on {(data['machine'].get('gpu') or {}).get('name', 'CPU')}", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="llava-1.5-7b")
    p.add_argument("--methods", default="tome,divprune,pool,mustdrop")
    p.add_argument("--budgets", default="192,128,64,32")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=60)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--kv-gib", type=float, default=16.0, help="KV-cache budget (GiB) a wave may fill")
    p.add_argument("--prefill-repeats", type=int, default=5)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/gpu-<geometry>.json on a GPU, else required)")
    p.add_argument("--plot", type=Path, default=None, help="only plot an existing JSON next to it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.plot is not None:
        data = json.loads(args.plot.read_text())
        print("plot:", plot(data, args.plot.with_suffix(".png")) and args.plot.with_suffix(".png"))
        return None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.out is None:
        if device.type != "cuda":
            raise SystemExit("gpu_llava: give --out for a run without a GPU (results/ holds GPU runs only)")
        args.out = RESULTS_DIR / f"gpu-{args.geometry}.json"
    dtype = torch.bfloat16
    started = time.time()
    machine = machine_info()
    torch.manual_seed(0)
    models = build(GEOMETRIES[args.geometry], device, dtype)
    arms = []
    for arm in make_arms([m for m in args.methods.split(",") if m], [int(b) for b in args.budgets.split(",") if b]):
        result = run_arm(arm, models, args, device, dtype)
        arms.append(result)
        print(f"{result['name']:14s} batch {result['batch']:4d}  {result['requests_per_s']:8.2f} req/s  "
              f"encoder {result['encoder_ms_per_image']:8.2f} ms/img  prefill {result['prefill_ms']:8.2f} ms",
              flush=True)
    add_ratios(arms)
    data = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "gpu-geometry",
        "created": timestamp(),
        "duration_s": time.time() - started,
        "machine": machine,
        "model": f"{args.geometry} geometry, dummy {str(dtype).removeprefix('torch.')} weights",
        "config": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
                   if key not in ("plot",)},
        "kv_bytes_per_token": kv_bytes_per_token(models[2]),
        "arms": arms,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(data))
    plotted = plot(data, args.out.with_suffix(".png"))
    print(markdown(data))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')}" + (f", {args.out.with_suffix('.png')}" if plotted else
                                                                  " (no matplotlib: plot later with --plot)"))
    return data


if __name__ == "__main__":
    main()
