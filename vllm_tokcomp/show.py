"""``tokcomp show``: which parts of an image a method keeps for a question, drawn over the image.

For a LLaVA-1.5 model folder (default: the bundled tiny LLaVA) the image goes through the model's own processor
(resize and crop to what the model sees) and tower with transformers, and the method runs on the signals the
server would hand it: the feature layer's [CLS] attention and keys, the question's embeddings, the LM probe's text
attention, MustDrop's stage 1 inside the tower (vllm_tokcomp.hf_signals). Every patch is drawn in the colour of
the token it went to, with a line between patches of different tokens, so merged groups show as regions and
pruning as single kept patches; dropped patches are dimmed.

    tokcomp show photo.png --method tome --budget 64 -o tome.png
    tokcomp show photo.png --methods tome,divprune,pool,mustdrop --budget 16 --question "What colour is the car?"
"""

from __future__ import annotations

import argparse
import colorsys
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .config import BUDGET_KEY, METHOD_KEY, ConfigError, method_reads_text, parse_engine_config
from .connectors import is_connector_method
from .hf_signals import encode, encode_with_stage1, probe_text_attention
from .methods import TokenAssignment, VisualTokens, get_method, method_class
from .methods.mustdrop_stages import MustDropStage1

DIM = 0.25  # brightness left to a dropped patch
TINT = 0.45  # share of a kept patch's colour that is its token's colour
GOLDEN = 0.618033988749895


@dataclass(frozen=True)
class Selection:
    image: Image.Image  # what the model sees (after its processor's resize and crop)
    grid: tuple[int, int]
    assignment: TokenAssignment  # the grid's patches -> output tokens


class LlavaViewer:
    """A LLaVA-1.5 model loaded with transformers, its tower cut at the feature layer as vLLM builds it."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

        model_type = AutoConfig.from_pretrained(path).model_type
        if model_type != "llava":
            raise ValueError(f"tokcomp show draws LLaVA-1.5 models; {path} is a {model_type!r} model: a server "
                             "serving it draws its selections at POST /tokcomp/preview?png=true "
                             "(docs/observability.md)")
        self.model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        config = self.model.config
        if config.vision_config.model_type != "clip_vision_model":
            raise ValueError(f"tokcomp show draws LLaVA-1.5 models with a CLIP tower; {path} has "
                             f"{config.vision_config.model_type!r}")
        tower = self.model.model.vision_tower
        layers = tower.encoder.layers if hasattr(tower, "encoder") else tower.vision_model.encoder.layers
        keep = len(layers) + 1 + config.vision_feature_layer if config.vision_feature_layer < 0 else \
            config.vision_feature_layer
        del layers[keep:]
        side = config.vision_config.image_size // config.vision_config.patch_size
        self.grid = (side, side)

    @torch.inference_mode()
    def select(self, image: Image.Image, method: str, budget: int, question: str) -> Selection:
        pixels = self.processor.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        seen = to_image(pixels[0], self.processor.image_processor)
        tower, projector = self.model.model.vision_tower, self.model.model.multi_modal_projector
        decoder = self.model.model.language_model
        text = decoder.embed_tokens(self._query_ids(question)) if method_reads_text(method) else None
        probe = method_class(method).reads_lm_probe()
        if method == "mustdrop" and get_method(method).stage1:
            merged = encode_with_stage1(tower, projector, pixels[0], budget, MustDropStage1(key_ratio=0.0), self.grid)
            tokens = VisualTokens(
                features=merged.features, grid=(merged.features.shape[0],),
                cls_attention=merged.signals.cls_attention, keys=merged.signals.keys,
                key_heads=merged.signals.key_heads, sizes=merged.sizes,
                text_embeds=text,
                text_attention=None if text is None else probe_text_attention(decoder, merged.features, text))
            result = get_method(method, stage1=False)(tokens, budget)
            return Selection(seen, self.grid, merged.assignment.then(result.assignment))
        features, signals = encode(tower, projector, pixels)
        tokens = VisualTokens(
            features=features[0], grid=self.grid, cls_attention=signals[0].cls_attention, keys=signals[0].keys,
            key_heads=signals[0].key_heads, layer_cls_attention=signals[0].layer_cls_attention,
            text_embeds=text,
            text_attention=None if text is None or not probe else probe_text_attention(decoder, features[0], text))
        return Selection(seen, self.grid, get_method(method)(tokens, budget).assignment)

    def _query_ids(self, question: str) -> torch.Tensor:
        """The prompt's text tokens as the server collects them: the chat prompt without image or special tokens."""
        from .integration.settings import query_ids

        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        tokenizer = self.processor.tokenizer
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        excluded = {self.model.config.image_token_index, *tokenizer.all_special_ids}
        return torch.tensor(query_ids(ids, excluded), dtype=torch.long)


def to_image(pixels: torch.Tensor, image_processor: object) -> Image.Image:
    """A normalised ``[3, H, W]`` tensor back to the RGB image the model sees; a ``uint8`` tensor is taken as the
    raw pixels (vLLM's ``mm_device_do_normalize``, on by default for Qwen2-VL, normalises on the device)."""
    if pixels.dtype == torch.uint8:
        rgb = pixels
    else:
        mean = torch.tensor(image_processor.image_mean)[:, None, None]
        std = torch.tensor(image_processor.image_std)[:, None, None]
        rgb = ((pixels.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(rgb.permute(1, 2, 0).contiguous().numpy())


def qwen_pixels_to_image(patches: torch.Tensor, grid_thw: tuple[int, int, int], image_processor: object,
                         merge_size: int = 2) -> Image.Image:
    """The first frame a Qwen2-VL image processor's flattened ``[t * h * w, C * tp * p * p]`` patches come from.

    Inverts ``Qwen2VLImageProcessor``'s layout: patches ordered by merged window, then the ``merge x merge`` patches
    inside it, each ``(C, temporal, p, p)``; then undoes the normalisation (:func:`to_image`)."""
    t, h, w = grid_thw
    channels = 3
    temporal = image_processor.temporal_patch_size
    patch = image_processor.patch_size
    grid = patches.reshape(t, h // merge_size, w // merge_size, merge_size, merge_size, channels, temporal,
                                   patch, patch)
    # (t, H/m, W/m, m, m, C, tp, p, p) -> (t, tp, C, H/m, m, p, W/m, m, p)
    frames = grid.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t, temporal, channels, h * patch, w * patch)
    return to_image(frames[0, 0], image_processor)


def token_colour(slot: int) -> tuple[int, int, int]:
    """Distinct, deterministic colours for neighbouring slots (golden-ratio hues)."""
    red, green, blue = colorsys.hsv_to_rgb((slot * GOLDEN) % 1.0, 0.85, 0.95)
    return round(255 * red), round(255 * green), round(255 * blue)


def draw(selection: Selection) -> Image.Image:
    """The image with every patch tinted by its token's colour, token borders drawn, dropped patches dimmed."""
    return draw_groups(selection.image, selection.grid, selection.assignment.destination.tolist())


def draw_groups(image: Image.Image, grid: tuple[int, int], destination: list[int]) -> Image.Image:
    """``image`` cut into ``grid`` patches, patch ``i`` drawn for output token ``destination[i]`` (-1: dropped)."""
    image = image.convert("RGB")
    rows, cols = grid
    width, height = image.size
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    out = pixels.clone()
    ph, pw = height // rows, width // cols
    for index, slot in enumerate(destination):
        r, c = divmod(index, cols)
        box = (slice(r * ph, (r + 1) * ph), slice(c * pw, (c + 1) * pw))
        if slot < 0:
            out[box] = pixels[box] * DIM
        else:
            out[box] = pixels[box] * (1 - TINT) + torch.tensor(token_colour(slot), dtype=torch.float32) * TINT
    result = Image.fromarray(out.round().clamp(0, 255).to(torch.uint8).numpy())
    pen = ImageDraw.Draw(result)
    for index, slot in enumerate(destination):
        r, c = divmod(index, cols)
        if slot < 0:
            continue
        if c + 1 < cols and destination[index + 1] != slot:
            pen.line([((c + 1) * pw, r * ph), ((c + 1) * pw, (r + 1) * ph - 1)], fill=(0, 0, 0))
        if r + 1 < rows and destination[index + cols] != slot:
            pen.line([(c * pw, (r + 1) * ph), ((c + 1) * pw - 1, (r + 1) * ph)], fill=(0, 0, 0))
    return result


def panel_grid(panels: list[tuple[str, Image.Image]], columns: int = 4) -> Image.Image:
    """Panels side by side (``columns`` per row), each titled."""
    width, height = panels[0][1].size
    title = 18
    rows = (len(panels) + columns - 1) // columns
    cols = min(columns, len(panels))
    sheet = Image.new("RGB", (cols * width, rows * (height + title)), "white")
    pen = ImageDraw.Draw(sheet)
    for index, (name, image) in enumerate(panels):
        r, c = divmod(index, columns)
        sheet.paste(image, (c * width, r * (height + title) + title))
        pen.text((c * width + 4, r * (height + title) + 3), name, fill=(0, 0, 0))
    return sheet


def summary(method: str, budget: int, assignment: TokenAssignment) -> str:
    destination = assignment.destination
    kept = destination >= 0
    merged = int(kept.sum()) - assignment.num_outputs  # patches folded into another patch's token
    return (f"{method}@{budget}: {destination.numel()} patches -> {assignment.num_outputs} tokens "
            f"({int((~kept).sum())} patches dropped, {merged} merged into other tokens)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokcomp show", description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--method", default=None, help="one method")
    parser.add_argument("--methods", default=None, help="several methods, drawn side by side")
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--question", default="What is in the image?")
    parser.add_argument("--model", default=None, help="a LLaVA-1.5 model folder (default: the bundled tiny LLaVA)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    methods = [m for m in (args.methods or args.method or "").split(",") if m]
    if not methods:
        parser.error("give --method or --methods")
    try:
        for method in methods:
            if is_connector_method(method):
                raise ConfigError(METHOD_KEY, f"{method!r} is a trained connector; show draws the selection methods")
            parse_engine_config({METHOD_KEY: method, BUDGET_KEY: args.budget})  # the server's own checks
        image = Image.open(args.image)
    except (ConfigError, OSError) as error:
        print(f"tokcomp show: {error}", file=sys.stderr)
        return 2
    if args.model is None:
        from .cli import bundled_model_dir

        args.model = bundled_model_dir("tiny-llava", build=True)
    try:
        viewer = LlavaViewer(args.model)
    except ValueError as error:
        print(f"tokcomp show: {error}", file=sys.stderr)
        return 2
    panels = []
    for method in methods:
        selection = viewer.select(image, method, args.budget, args.question)
        print(summary(method, args.budget, selection.assignment))
        panels.append((f"{method} @ {args.budget}", draw(selection)))
    sheet = panels[0][1] if len(panels) == 1 else panel_grid(panels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")
    return 0
