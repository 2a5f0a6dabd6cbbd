"""Which methods each served model family compresses, for images and videos: read from the methods' declared
capabilities through each integration's own routing rule (``llava_next.serves``, ``llava_onevision.serves``,
``qwen_routes.qwen_route``), so that the README's support matrix and ``tokcomp info`` cannot drift from what the
server accepts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import servable_methods
from ..methods import available_methods, method_class
from . import llava_next, llava_onevision, qwen_routes


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    modalities: tuple[str, ...]
    serves: Callable[[str], bool]
    route: Callable[[str], str | None] | None = None  # how the method decides, where the family has routes


FAMILIES = (
    Family("LLaVA-1.5", ("LlavaForConditionalGeneration",), ("image",), lambda m: m in servable_methods()),
    Family("LLaVA-NeXT", ("LlavaNextForConditionalGeneration",), ("image",), llava_next.serves),
    Family("LLaVA-OneVision", ("LlavaOnevisionForConditionalGeneration",), ("image", "video"),
           llava_onevision.serves),
    Family("Qwen2-VL, Qwen2.5-VL", ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
           ("image", "video"), lambda m: qwen_routes.qwen_route(m) is not None, qwen_routes.qwen_route),
    Family("Qwen3-VL (dense, MoE)", ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"),
           ("image", "video"), lambda m: qwen_routes.qwen_route(m) is not None, qwen_routes.qwen_route),
)


def support_matrix() -> str:
    """A markdown table: one row per library method (and the trained connectors), one column per family; a cell
    names the media it compresses (and, on Qwen, the route the method takes: ``layout``, ``pixels`` or
    ``encoder``), ``–`` where the family refuses the method."""
    header = "| method | family | " + " | ".join(f.name for f in FAMILIES) + " |"
    lines = [header, "|---|---|" + "---|" * len(FAMILIES)]
    for method in available_methods():
        cells = []
        for family in FAMILIES:
            if not family.serves(method):
                cells.append("–")
                continue
            route = family.route(method) if family.route else None
            cells.append(", ".join(family.modalities) + (f" ({route})" if route else ""))
        lines.append(f"| `{method}` | {method_class(method).family} | " + " | ".join(cells) + " |")
    connectors = ["image" if f.name == "LLaVA-1.5" else "–" for f in FAMILIES]
    lines.append("| trained connectors (`tokcomp_connectors`) | learned | " + " | ".join(connectors) + " |")
    return "\n".join(lines) + "\n"
