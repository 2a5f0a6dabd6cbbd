"""Accuracy vs visual-token budget through vLLM with the tokcomp plugin.

``python benchmarks/accuracy.py [--data DIR] [--model DIR] [--methods all] [--budgets 576,192,128,64,32]
[--auto mustdrop:cosine,mustdrop:texture] [--connectors STEM ...]``

Runs every question of a data set (a folder with ``questions.jsonl`` in the format of
docs/dataset.md; default: the test split of the synthetic task, generated on first use) through
ONE vLLM engine with greedy decoding, for the uncompressed baseline and every method x budget
(the method and budget travel per request in ``mm_processor_kwargs``), plus the adaptive forms
(``tokcomp_budget: "auto"``: a per-image count estimated from the pixels, ``--auto METHOD[:ESTIMATOR]``).
Every arm also reports the visual tokens its images really got, read from the prompts vLLM ran (prompt
length minus the text tokens). Answers are scored by exact match after ``normalize_answer``. Writes
``OUT.json`` (every arm with its predictions, per question type), ``OUT.md`` (accuracy and
relative accuracy per method and budget, and per question type) and ``OUT.png`` (accuracy vs tokens
per image, one line per method, a star per adaptive arm).

``--connectors STEM ...`` loads trained connectors into the engine (``tokcomp_connectors``) and adds each as an
arm at its own count (LLaVA).

A data set of clips (``data.generate --videos``: records with ``"video"``, a folder of frames) runs the same way on
a Qwen model: each clip is one video of all its frames, budgets are per clip, and the full count is what the model's
video processor makes of a clip.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vllm_tokcomp.bench.common import RESULTS_DIR, output_file, provenance, provenance_line  # noqa: E402

FULL = 576  # the tiny LLaVA's image tokens (a Qwen model's come from its processor: full_image_tokens)
DEFAULT_BUDGETS = (576, 192, 128, 64, 32, 16, 8)
# the default budgets as fractions of the full count
BUDGET_FRACTIONS = (1, 1 / 3, 2 / 9, 1 / 9, 1 / 18, 1 / 36, 1 / 72)
BASELINE = "none"  # the uncompressed arm's name in every table (and in --methods)
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
TILED_TYPES = ("llava_next", "llava_onevision")  # an image is a base view plus tiles: its count from its processor
DEFAULT_AUTO = "mustdrop:cosine,mustdrop:texture"
AUTO = "auto"
DEFAULT_OUT = RESULTS_DIR / "accuracy"


# ----------------------------------------------------------------------------- data and scoring
def load_dataset(folder: Path, limit: int | None = None) -> list[dict]:
    records = []
    with open(folder / "questions.jsonl") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                record.setdefault("type", "all")
                if "video" in record:
                    record["video_path"] = str(folder / record["video"])
                else:
                    record["image_path"] = str(folder / record["image"])
                records.append(record)
    if len({"video_path" in r for r in records}) > 1:
        raise SystemExit(f"{folder}: mixes image and video records; give one kind per data set")
    return records[:limit] if limit else records


def _data_root() -> Path:
    return Path(os.environ.get("TOKCOMP_DATA_DIR", Path.home() / ".cache" / "vllm-tokcomp" / "data"))


def _generated(out: Path, arguments: list[str]) -> Path:
    """``out`` written by ``data.generate`` once: into a temporary sibling renamed into place under a lock, so
    processes that ask at the same time (parallel test workers, two benchmarks) never read a half-written split."""
    from vllm_tokcomp.data.generate import main as generate
    from vllm_tokcomp.tiny.files import build_in_place

    def ready() -> bool:
        return (out / "test" / "questions.jsonl").exists() and (out / "spec.json").exists()

    return build_in_place(out, ready, lambda tmp: generate([str(tmp), *arguments]))


def default_dataset(seed: int = 0, images: int = 250) -> Path:
    """The synthetic test split (``images`` images, 2 questions each), generated once into a cache folder."""
    out = _data_root() / f"vqa-v1-seed{seed}-test{images}"
    return _generated(out, ["--seed", str(seed), "--test", str(images)]) / "test"


def default_video_dataset(seed: int = 0, clips: int = 100, frames: int = 4) -> Path:
    """The synthetic video test split (``clips`` clips of ``frames`` frames, 2 questions each), generated once."""
    out = _data_root() / f"vqa-video-v1-seed{seed}-f{frames}-test{clips}"
    return _generated(out, ["--videos", "--frames", str(frames), "--seed", str(seed), "--test", str(clips)]) / "test"


def score(records: list[dict], predictions: list[str]) -> dict:
    from vllm_tokcomp.data.spec import normalize_answer

    hits: dict[str, list[bool]] = defaultdict(list)
    by_difficulty: dict[str, list[bool]] = defaultdict(list)
    for record, prediction in zip(records, predictions, strict=True):
        ok = normalize_answer(prediction) == normalize_answer(record["answer"])
        hits["all"].append(ok)
        hits[record["type"]].append(ok)
        if "difficulty" in record:  # the harder split labels each question easy or hard
            by_difficulty[record["difficulty"]].append(ok)
    result = {
        "accuracy": sum(hits["all"]) / max(1, len(hits["all"])),
        "n": len(hits["all"]),
        "per_type": {t: sum(v) / len(v) for t, v in sorted(hits.items()) if t != "all"},
    }
    if by_difficulty:
        result["per_difficulty"] = {d: sum(v) / len(v) for d, v in sorted(by_difficulty.items())}
    return result


# ----------------------------------------------------------------------------- engine
def _engine_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_PLUGINS", "tokcomp")
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="tokcomp-acc-vllm-"))


Arm = tuple[str, "int | str", "str | None"]  # (method, budget or "auto", auto estimator or None)


def arm_kwargs(arm: Arm) -> dict:
    method, budget, estimator = arm
    kwargs = {"tokcomp_method": method, "tokcomp_budget": budget}
    if estimator:
        kwargs["tokcomp_options"] = {"auto_estimator": estimator}
    return kwargs


def parse_auto(text: str) -> list[Arm]:
    """``"mustdrop:texture,tome"`` -> adaptive arms (estimator None: the method's default)."""
    arms = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        method, _, estimator = item.partition(":")
        arms.append((method, AUTO, estimator or None))
    return arms


def run_arms(model: str, records: list[dict], arms: list[Arm], *, chunk: int, max_tokens: int,
             progress: bool = True, on_arm=None,  # noqa: ANN001
             engine_kwargs: dict | None = None, full: int = FULL) -> tuple[list[list[str]], list[list[int]]]:
    """Greedy answers and prompt lengths of every record for every arm, from one engine: images through
    ``llm.chat``, clips (records with ``video_path``) as one video each in the model's own chat prompt.
    ``engine_kwargs``: the engine's ``--mm-processor-kwargs`` (e.g. the trained connectors it loads); ``full``: an
    uncompressed image's tokens (the engine's context fits it and the question).

    ``on_arm(answers_so_far, prompt_lengths_so_far)`` is called after each arm (the harness writes partial
    reports)."""
    _engine_env()
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    if records and "video_path" in records[0]:
        llm = LLM(model=model, max_model_len=2048, enforce_eager=True, seed=0,
                  limit_mm_per_prompt={"image": 0, "video": 1}, mm_processor_kwargs=engine_kwargs)
        prompts = video_prompts(model, records)

        def answer(batch: list, kwargs: dict | None) -> list:
            return llm.generate(batch, params, mm_processor_kwargs=kwargs, use_tqdm=False)
    else:
        # LLaVA-1.5's 576-token images fit 1024; a tiled image (LLaVA-NeXT) needs a longer context and step
        long = {} if full + 512 <= 1024 else {"max_model_len": full + 512, "max_num_batched_tokens": full + 512}
        llm = LLM(model=model, **{"max_model_len": 1024, **long}, enforce_eager=True, seed=0,
                  limit_mm_per_prompt={"image": 1}, mm_processor_kwargs=engine_kwargs)
        prompts = image_conversations(records)

        def answer(batch: list, kwargs: dict | None) -> list:
            return llm.chat(batch, params, mm_processor_kwargs=kwargs, use_tqdm=False)

    results, lengths = [], []
    bar = tqdm(total=len(arms) * len(records), unit="q", disable=not progress, dynamic_ncols=True)
    for arm in arms:
        bar.set_description(arm_label(arm))
        answers, prompt_lengths = [], []
        for start in range(0, len(prompts), chunk):
            outputs = answer(prompts[start:start + chunk], arm_kwargs(arm))
            answers += [o.outputs[0].text for o in outputs]
            prompt_lengths += [len(o.prompt_token_ids) for o in outputs]
            bar.update(len(outputs))
        results.append(answers)
        lengths.append(prompt_lengths)
        if on_arm is not None:
            on_arm(results, lengths)
    bar.close()
    return results, lengths


def image_conversations(records: list[dict]) -> list[list[dict]]:
    """One single-image chat conversation per record (each image read once)."""
    from PIL import Image

    images = {}
    for record in records:
        if record["image_path"] not in images:
            with Image.open(record["image_path"]) as image:
                images[record["image_path"]] = image.convert("RGB")
    return [[{"role": "user", "content": [{"type": "image_pil", "image_pil": images[r["image_path"]]},
                                          {"type": "text", "text": r["question"]}]}] for r in records]


def load_clip(folder: str):  # noqa: ANN201 - numpy uint8 [frames, H, W, 3]
    """A clip's frames (``00.png``, ``01.png``, ... in name order) as one array."""
    import numpy as np
    from PIL import Image

    frames = []
    for path in sorted(Path(folder).glob("*.png")):
        with Image.open(path) as frame:
            frames.append(np.asarray(frame.convert("RGB")))
    if not frames:
        raise SystemExit(f"{folder}: no frames (*.png)")
    return np.stack(frames)


def video_prompts(model: str, records: list[dict]) -> list[dict]:
    """One prompt per record: the model's chat template around a video and the question, the clip as the video."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    clips = {r["video_path"]: load_clip(r["video_path"]) for r in records}
    prompts = []
    for r in records:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": r["question"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        prompts.append({"prompt": text, "multi_modal_data": {"video": clips[r["video_path"]]}})
    return prompts


def arm_label(arm: Arm) -> str:
    method, budget, estimator = arm
    return f"{method}@{budget}" + (f"[{estimator}]" if estimator else "")


# ----------------------------------------------------------------------------- reports
def markdown(report: dict) -> str:
    budgets = report["budgets"]
    full = report.get("full_tokens", FULL)
    base = report["baseline"]["accuracy"]
    lines = [
        f"# Accuracy vs visual tokens ({report['model_name']}, {report['n']} questions)",
        "",
        f"Data: `{report['data']}`; greedy, exact match after normalisation; one vLLM engine, method and budget "
        "per request. Cells: accuracy (relative to uncompressed).",
        "",
        *([provenance_line(report["provenance"]), ""] if report.get("provenance") else []),
        f"The `{BASELINE}` row is the uncompressed arm ({full} tokens per image); every method's {full}-token "
        "cell is that same arm.",
        "",
        "| method | " + " | ".join(f"{b} tok" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    by_arm = {(a["method"], a["budget"]): a for a in report["arms"] if a["budget"] != AUTO}
    for method in [BASELINE, *report["methods"]]:
        cells = []
        for b in budgets:
            arm = report["baseline"] if b >= full else None if method == BASELINE else by_arm.get((method, b))
            cells.append("–" if arm is None else f"{arm['accuracy']:.3f} ({arm['accuracy'] / base:.0%})"
                         if base else f"{arm['accuracy']:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    adaptive = [a for a in report["arms"] if a["budget"] == AUTO]
    if adaptive:
        lines += ["", "## Adaptive budgets (`tokcomp_budget: \"auto\"`, a count per image from its pixels)", "",
                  "| method | estimator | visual tokens (mean, min–max) | accuracy (rel) |", "|---|---|---:|---:|"]
        for arm in adaptive:
            rel = f" ({arm['accuracy'] / base:.0%})" if base else ""
            tokens = f"{arm['tokens']:.0f} ({arm['tokens_min']}–{arm['tokens_max']})" if "tokens" in arm else "–"
            lines.append(f"| {arm['method']} | {arm.get('estimator') or 'default'} | {tokens} | "
                         f"{arm['accuracy']:.3f}{rel} |")
    types = sorted(report["baseline"]["per_type"])
    lines += ["", "## Per question type", "",
              "| method | budget | tokens | all | rel | " + " | ".join(types) + " |",
              "|---|---:|---:|---:|---:|" + "---:|" * len(types)]
    for arm in [report["baseline"], *report["arms"]]:
        rel = f"{arm['accuracy'] / base:.0%}" if base else "–"
        budget = arm["budget"] if arm["budget"] != AUTO else f"auto[{arm.get('estimator') or 'default'}]"
        tokens = f"{arm['tokens']:.0f}" if "tokens" in arm else "–"
        lines.append(f"| {arm['method']} | {budget} | {tokens} | {arm['accuracy']:.3f} | {rel} | "
                     + " | ".join(f"{arm['per_type'].get(t, float('nan')):.2f}" for t in types) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    base = report["baseline"]["accuracy"]
    for method in report["methods"]:
        pts = sorted((a["budget"], a["accuracy"]) for a in report["arms"] if a["method"] == method
                     and a["budget"] != AUTO)
        pts.append((report.get("full_tokens", FULL), base))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    for arm in report["arms"]:
        if arm["budget"] == AUTO and "tokens" in arm:
            ax.plot([arm["tokens"]], [arm["accuracy"]], marker="*", markersize=12, linestyle="none",
                    label=f"{arm['method']} auto[{arm.get('estimator') or 'default'}]")
    ax.axhline(base, color="black", linestyle="--", linewidth=1, label="uncompressed")
    if report.get("chance") is not None:
        ax.axhline(report["chance"], color="gray", linestyle=":", linewidth=1, label="majority answer")
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["budgets"], [str(b) for b in report["budgets"]])
    ax.set_xlabel("visual tokens per image")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{report['model_name']}: accuracy vs tokens ({report['n']} questions)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_or_default(model: str | None) -> str:
    """``model``, or the bundled trained tiny LLaVA's folder (built on first use); a bundled model's name
    (``tiny-qwen2-vl``, ``tiny-qwen2.5-vl``): that model's folder, as ``tokcomp serve`` resolves it."""
    from vllm_tokcomp.cli import BUNDLED_MODELS, bundled_model_dir

    if model is None or model in BUNDLED_MODELS:
        return str(bundled_model_dir(model or "tiny-llava", build=True))
    return model


def llava_prompt(processor, record: dict) -> tuple[list[int], object]:  # noqa: ANN001 - a transformers processor
    """One question as transformers' LLaVA gets it: the chat template's token ids (BOS from the template, as in
    vLLM; the one ``<image>`` placeholder not expanded) and the image's ``pixel_values`` (``[1, 3, H, W]``)."""
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    with Image.open(record["image_path"]) as image:
        pixels = processor.image_processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"], pixels


def model_type(model: str) -> str:
    return json.loads((Path(model) / "config.json").read_text()).get("model_type", "")


def full_image_tokens(model: str, records: list[dict]) -> int:
    """Visual tokens of one uncompressed image: LLaVA's fixed count, or for a Qwen model what its own image
    processor makes of the images (which must then all give the same count: budgets are counts)."""
    videos = bool(records) and "video_path" in records[0]
    if model_type(model) not in QWEN_TYPES:
        if videos:
            raise SystemExit(f"video data sets need a Qwen model; {model} is {model_type(model) or 'unknown'}")
        if model_type(model) in TILED_TYPES:
            return tiled_image_tokens(model, records)
        return json.loads((Path(model) / "config.json").read_text()).get("image_seq_length", FULL)
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    merge = processor.image_processor.merge_size**2
    counts = set()
    for path in sorted({r["video_path" if videos else "image_path"] for r in records}):
        if videos:
            out = processor.video_processor(videos=[load_clip(path)], do_sample_frames=False, return_tensors="pt")
            counts.add(int(out["video_grid_thw"].prod()) // merge)
            continue
        with Image.open(path) as image:
            counts.add(int(processor.image_processor(images=[image.convert("RGB")],
                                                     return_tensors="pt")["image_grid_thw"].prod()) // merge)
    if len(counts) != 1:
        raise SystemExit(f"the {'clips' if videos else 'images'} give {sorted(counts)} visual tokens each on {model}: "
                         "this harness compares fixed budgets, so give it media of one size")
    return counts.pop()


def tiled_image_tokens(model: str, records: list[dict]) -> int:
    """Placeholders of one uncompressed image on a tiled model (LLaVA-NeXT): the ``<image>`` tokens its own HF
    processor expands one image to (base view, tiles, newlines), which must be the same for every image."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    counts = set()
    for path in sorted({r["image_path"] for r in records}):
        with Image.open(path) as image:
            ids = processor(text=processor.image_token, images=[image.convert("RGB")])["input_ids"][0]
        counts.add(sum(1 for t in ids if t == image_id))
    if len(counts) != 1:
        raise SystemExit(f"the images give {sorted(counts)} visual tokens each on {model}: this harness compares fixed "
                         "budgets, so give it images of one size")
    return counts.pop()


def methods_for(model: str) -> list[str]:
    """Every method the plugin serves on ``model`` (Qwen: those without [CLS] attention; LLaVA-NeXT and
    LLaVA-OneVision: their rules)."""
    from vllm_tokcomp.config import servable_methods

    if model_type(model) in TILED_TYPES:
        from vllm_tokcomp.integration import llava_next, llava_onevision

        serves = llava_onevision.serves if model_type(model) == "llava_onevision" else llava_next.serves
        return [m for m in servable_methods() if serves(m)]
    if model_type(model) not in QWEN_TYPES:
        return servable_methods()
    from vllm_tokcomp.integration.qwen_routes import SERVED_METHODS

    return [m for m in servable_methods() if m in SERVED_METHODS]


def connector_setup(stems: list[Path]) -> tuple[dict | None, list[Arm]]:
    """The engine kwargs that load ``stems`` and one arm per connector (its method at its count); a bad listing
    stops here with the plugin's own message."""
    if not stems:
        return None, []
    from vllm_tokcomp.config import CONNECTORS_KEY, ConfigError, engine_connectors

    engine_kwargs = {CONNECTORS_KEY: [str(stem) for stem in stems]}
    try:
        catalog = engine_connectors(engine_kwargs)
    except ConfigError as error:
        raise SystemExit(f"--connectors: {error}") from None
    return engine_kwargs, [(method, count, None) for method, count in catalog]


def write_report(out: Path, report: dict, text: str) -> None:
    """``OUT.json`` and ``OUT.md``, then the markdown and where it went on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    output_file(out, ".json").write_text(json.dumps(report, indent=1) + "\n")
    output_file(out, ".md").write_text(text)
    print(text)
    print(f"wrote {output_file(out, '.json')} and .md ({report['seconds']:.0f}s)")


def majority_baseline(records: list[dict]) -> float:
    """Accuracy of always giving each question type's most common answer (a floor for 'sees nothing')."""
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        by_type[r["type"]][r["answer"]] += 1
    return sum(max(c.values()) for c in by_type.values()) / max(1, len(records))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="folder with questions.jsonl (default: test split)")
    parser.add_argument("--videos", action="store_true", help="default data: the synthetic video test split "
                        "(100 clips of 4 frames, 2 questions each) instead of the images")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled trained tiny LLaVA), or a "
                        "bundled model's name (tiny-llava, tiny-llava-next, tiny-llava-onevision-vqa, tiny-qwen2-vl, "
                        "tiny-qwen2.5-vl, tiny-qwen3-vl-vqa, ...)")
    parser.add_argument("--methods", default="all", help="comma list of servable methods, or 'all' (those the "
                        f"model's family serves), or '{BASELINE}' for the uncompressed arm alone (always run)")
    parser.add_argument("--budgets", default=None, help="comma list of token counts per image (default "
                        f"{','.join(map(str, DEFAULT_BUDGETS))} for LLaVA: the full count x "
                        f"{', '.join(f'{f:.3g}' for f in BUDGET_FRACTIONS)})")
    parser.add_argument("--auto", default=None,
                        help=f"adaptive-budget arms, METHOD[:ESTIMATOR] comma list ('' for none; default "
                        f"{DEFAULT_AUTO} for LLaVA-1.5, none for the others)")
    parser.add_argument("--connectors", type=Path, nargs="*", default=[],
                        help="trained connectors (STEM of STEM.json) the engine loads, each an arm at its count "
                        "(e.g. connectors/c_abstractor-16)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--chunk", type=int, default=64, help="requests per llm.chat call")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path stem (.json/.md/.png)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    data = args.data or (default_video_dataset() if args.videos else default_dataset())
    model = model_or_default(args.model)
    records = load_dataset(Path(data), args.limit)
    full = full_image_tokens(model, records)
    served = methods_for(model)
    methods = served if args.methods == "all" else [m for m in args.methods.split(",") if m and m != BASELINE]
    unknown = sorted(set(methods) - set(served))
    if unknown:
        parser.error(f"not servable through vLLM on {model_type(model)}: {', '.join(unknown)}")
    budget_text = args.budgets or ",".join(str(max(1, round(full * f))) for f in BUDGET_FRACTIONS)
    budgets = sorted({int(b) for b in budget_text.split(",") if b}, reverse=True)
    if full not in budgets:
        budgets.insert(0, full)
    default_auto = "" if model_type(model) in QWEN_TYPES + TILED_TYPES or args.methods == BASELINE else DEFAULT_AUTO
    auto = args.auto if args.auto is not None else default_auto
    adaptive = parse_auto(auto)
    unknown = sorted({m for m, _, _ in adaptive} - set(served))
    if unknown:
        parser.error(f"--auto: not servable through vLLM: {', '.join(unknown)}")
    arms: list[Arm] = [("none", full, None)] + [(m, b, None) for m in methods for b in budgets if b < full] + adaptive
    # Each connector is an arm at its own count (a column of the table; the other methods are not run there).
    engine_kwargs, connector_arms = connector_setup(args.connectors)
    arms += connector_arms
    methods += sorted({method for method, _, _ in connector_arms})
    budgets = sorted({*budgets, *(count for _, count, _ in connector_arms)}, reverse=True)
    start = time.perf_counter()
    measured_with = provenance(model)

    def write(answers: list[list[str]], lengths: list[list[int]]) -> dict:
        report = build_report(model, data, records, budgets, methods, arms, answers, time.perf_counter() - start,
                              lengths, full=full)
        report["provenance"] = measured_with
        args.out.parent.mkdir(parents=True, exist_ok=True)
        output_file(args.out, ".json").write_text(json.dumps(report, indent=1) + "\n")
        output_file(args.out, ".md").write_text(markdown(report))
        plot(report, output_file(args.out, ".png"))
        return report

    answers, lengths = run_arms(model, records, arms, chunk=args.chunk, max_tokens=args.max_tokens,
                                progress=not args.no_progress, on_arm=write, engine_kwargs=engine_kwargs, full=full)
    report = write(answers, lengths)
    print(markdown(report))
    print(f"wrote {output_file(args.out, '.json')}, .md, .png ({report['seconds']:.0f}s)")
    return 0


def build_report(model: str, data: Path, records: list[dict], budgets: list[int], methods: list[str],
                 arms: list[Arm], answers: list[list[str]], elapsed: float,
                 lengths: list[list[int]] | None = None, full: int = FULL) -> dict:
    """The report over the arms answered so far (``complete`` is False for a partial one). With ``lengths`` (each
    arm's prompt lengths, the baseline's first), each arm gets the visual tokens its images really got: prompt
    length minus the baseline's text tokens (its prompt length minus the ``full`` image tokens)."""
    scored = []
    for i, ((method, budget, estimator), arm_answers) in enumerate(zip(arms, answers, strict=False)):
        arm = {"method": method, "budget": budget, **score(records, arm_answers), "predictions": arm_answers}
        if estimator:
            arm["estimator"] = estimator
        if lengths is not None:
            visual = [n - (base - full) for n, base in zip(lengths[i], lengths[0], strict=True)]
            arm.update(tokens=sum(visual) / len(visual), tokens_min=min(visual), tokens_max=max(visual))
        scored.append(arm)
    return {
        "model": model,
        "model_name": Path(model).name,
        "data": str(data),
        "n": len(records),
        "budgets": budgets,
        "full_tokens": full,
        "methods": methods,
        "chance": majority_baseline(records),
        "seconds": round(elapsed, 1),
        "baseline": scored[0],
        "arms": scored[1:],
        "complete": len(answers) == len(arms),
        "baseline_predictions": [{"id": r.get("id"), "answer": r["answer"], "prediction": p}
                                 for r, p in zip(records, answers[0], strict=True)],
    }


if __name__ == "__main__":
    raise SystemExit(main())
