"""``tokcomp`` command: ``serve`` starts vLLM's own OpenAI server with compression; ``info`` prints versions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .config import (
    ALLOW_OFF_KEY,
    ALLOWED_METHODS_KEY,
    BUDGET_KEY,
    BUDGET_RANGE_KEY,
    CONNECTORS_KEY,
    DEFAULT_METHOD,
    METHOD_KEY,
    OFF,
    RATIO_KEY,
    RATIO_RANGE_KEY,
    ConfigError,
    parse_engine_config,
    servable_methods,
)

PLUGIN_NAME = "tokcomp"
DEFAULT_CPU_KV_GIB = "2"
# MODEL shortcuts for the bundled tiny models (built on first use); no MODEL means tiny-llava
BUNDLED_MODELS = ("tiny-llava", "tiny-llava-next", "tiny-llava-onevision", "tiny-llava-onevision-vqa", "tiny-qwen2-vl",
                  "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-qwen3-vl-moe", "tiny-qwen3-vl-vqa")
_QWEN_VARIANTS = {"tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl"}


def bundled_model_dir(name: str, *, build: bool = False) -> Path:
    """The folder of a bundled tiny model (the trained one where its weights are bundled), built first if
    ``build``."""
    if name in _QWEN_VARIANTS:
        from .tiny import qwen2_vl_builder as qwen2_vl

        variant = _QWEN_VARIANTS[name]
        return qwen2_vl.ensure_served_model(variant) if build else qwen2_vl.served_model_dir(variant)
    if name in ("tiny-qwen3-vl", "tiny-qwen3-vl-moe"):  # random weights: for counts, positions, serving; not answers
        from .tiny import qwen3_vl_builder as qwen3_vl

        variant = name.removeprefix("tiny-").replace("-", "_")
        return qwen3_vl.ensure_default_model(variant) if build else qwen3_vl.default_model_dir(variant)
    if name == "tiny-qwen3-vl-vqa":  # trained on the VQA task (transplanted from the tiny Qwen2-VL): answers
        from .tiny import qwen3_vl_builder as qwen3_vl

        return qwen3_vl.ensure_trained_model() if build else qwen3_vl.trained_model_dir()
    if name == "tiny-llava-next":  # the tiny LLaVA's weights in the anyres layout: for counts and serving
        from .tiny import llava_next_builder as llava_next

        return llava_next.ensure_default_model() if build else llava_next.default_model_dir()
    if name == "tiny-llava-onevision":  # random weights: for counts and serving, not answers
        from .tiny import llava_onevision_builder as llava_onevision

        return llava_onevision.ensure_default_model() if build else llava_onevision.default_model_dir()
    if name == "tiny-llava-onevision-vqa":  # the tiny LLaVA's weights in OneVision's layout: answers
        from .tiny import llava_onevision_vqa_builder as llava_onevision_vqa

        return llava_onevision_vqa.ensure_default_model() if build else llava_onevision_vqa.default_model_dir()
    if name != "tiny-llava":
        raise ValueError(f"no bundled model {name!r}; bundled: {', '.join(BUNDLED_MODELS)}")
    from .tiny import llava_builder as llava

    return llava.ensure_served_model() if build else llava.served_model_dir()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: tokcomp serve [MODEL] [--method NAME] [--budget N | --ratio R] [--connector STEM ...]"
              " [--preview]")
        print("                     [--allowed-methods A,B] [--budget-range LOW:HIGH] [--ratio-range LOW:HIGH]")
        print("                     [--no-client-off] [vllm serve args...]")
        print(f"       (--budget/--ratio without --method: {DEFAULT_METHOD}; the range flags bound what clients "
              "may choose)")
        print(f"       (MODEL: a model folder or name, or {' / '.join(BUNDLED_MODELS)} for a bundled tiny model; "
              "default tiny-llava)")
        print("       tokcomp info")
        print("       tokcomp show IMAGE --method M --budget B [--question TEXT] [--model DIR] -o OUT.png")
        print(f"       tokcomp bench {{{','.join(BENCHMARKS)}}} [--help | options]")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "info":
        return info()
    if command == "show":
        from .show import main as show

        return show(rest)
    if command == "bench":
        return bench(rest)
    print(f"tokcomp: unknown command {command!r} (expected serve, info, show or bench)", file=sys.stderr)
    return 2


# ``tokcomp bench NAME``: the module of vllm_tokcomp.bench that runs it (each writes JSON + markdown + a plot).
BENCHMARKS = {
    "throughput": "throughput",  # offline requests/s, plain vLLM vs every method x budget, one interleaved run
    "memory-bound": "memory_bound",  # a small fixed KV cache: concurrent requests and throughput per arm
    "serve": "serving",  # the OpenAI server under load: TTFT, latency, throughput per arm
    "accuracy": "accuracy",  # answer accuracy vs visual tokens on the synthetic VQA task
    "method-cost": "method_cost",  # each method's cost per image next to a CLIP-L forward
    "gpu": "gpu_llava",  # LLaVA-1.5-7B geometry on a GPU, torch + transformers only
}


def bench(argv: Sequence[str]) -> int:
    """``tokcomp bench NAME [options]``: one of the product benchmarks, its options passed through."""
    if not argv or argv[0] not in BENCHMARKS:
        given = repr(argv[0]) if argv else "nothing"
        print(f"tokcomp bench: expected one of {', '.join(BENCHMARKS)}, got {given}", file=sys.stderr)
        return 2
    import importlib
    import runpy

    name = f"vllm_tokcomp.bench.{BENCHMARKS[argv[0]]}"
    importlib.import_module("vllm_tokcomp.bench")
    saved = sys.argv
    sys.argv = [f"tokcomp bench {argv[0]}", *argv[1:]]
    try:
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def build_serve_command(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The ``vllm serve`` command line and environment that ``tokcomp serve argv`` runs.

    Raises ``ConfigError`` naming the field for a bad method/budget, before vLLM starts.
    """
    parser = argparse.ArgumentParser(prog="tokcomp serve", add_help=False)
    parser.add_argument("--method", default=None)
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--ratio", type=float, default=None)
    parser.add_argument("--connector", action="append", default=None)
    parser.add_argument("--allowed-methods", dest="allowed_methods", default=None)
    parser.add_argument("--budget-range", dest="budget_range", default=None)
    parser.add_argument("--ratio-range", dest="ratio_range", default=None)
    parser.add_argument("--no-client-off", dest="client_off", action="store_false", default=None)
    parser.add_argument("--mm-processor-kwargs", dest="mm_processor_kwargs", default=None)
    parser.add_argument("--preview", action="store_true", help="load the endpoint plugin: POST /tokcomp/preview "
                        "and tokcomp_compression_seconds on /metrics")
    argv = list(argv)
    # Like `vllm serve`, the model is the first argument when it is not a flag.
    model = argv.pop(0) if argv and not argv[0].startswith("-") else None
    known, passthrough = parser.parse_known_args(argv)

    mm_kwargs: dict[str, object] = {}
    if known.mm_processor_kwargs:
        try:
            mm_kwargs = json.loads(known.mm_processor_kwargs)
        except json.JSONDecodeError as error:
            raise ConfigError("--mm-processor-kwargs", f"is not valid JSON: {error}") from None
        if not isinstance(mm_kwargs, dict):
            raise ConfigError("--mm-processor-kwargs", "must be a JSON object")
    if known.method is not None:
        mm_kwargs[METHOD_KEY] = known.method
    if known.budget is not None:
        mm_kwargs[BUDGET_KEY] = known.budget
    if known.ratio is not None:
        mm_kwargs[RATIO_KEY] = known.ratio
    if not any(key in mm_kwargs for key in (METHOD_KEY, BUDGET_KEY, RATIO_KEY)):
        mm_kwargs[METHOD_KEY] = OFF  # the plugin on, compression off until a request opts in
    if known.connector:
        # Absolute, so that the engine (whatever its working directory) reads the same files.
        mm_kwargs[CONNECTORS_KEY] = [str(Path(stem).expanduser().resolve()) for stem in known.connector]
    mm_kwargs.update(_limits_from_flags(known))
    spec = parse_engine_config(mm_kwargs)  # fail here, naming the field, rather than deep inside vLLM
    if spec is not None and METHOD_KEY not in mm_kwargs:
        print(f"tokcomp serve: no --method given, compressing with {spec.method} (the default method)",
              file=sys.stderr)

    if model is None or model in BUNDLED_MODELS:
        model = str(bundled_model_dir(model or "tiny-llava", build=True))
    command = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
        "--mm-processor-kwargs", json.dumps(mm_kwargs),
        # Clients may choose method/budget per request; the processor rejects every other key (HTTP 400).
        "--trust-request-mm-kwargs",
        *passthrough,
    ]
    env = dict(os.environ)
    if _needs_cpu_kv_default(passthrough, env):
        # vLLM-CPU reserves 92% of the NUMA node's memory by default and refuses to start when other
        # processes hold part of it; a fixed KV space is what the CPU docs recommend.
        env["VLLM_CPU_KVCACHE_SPACE"] = DEFAULT_CPU_KV_GIB
        print(f"tokcomp serve: CPU build, using VLLM_CPU_KVCACHE_SPACE={DEFAULT_CPU_KV_GIB} (GiB)", file=sys.stderr)
    binding = _cpu_thread_binding(passthrough, env)
    if binding is not None:
        env[THREAD_BIND_ENV] = binding
        print(f"tokcomp serve: CPU build with several workers, using {THREAD_BIND_ENV}={binding}", file=sys.stderr)
    plugins = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p and p != "none"]
    if "VLLM_PLUGINS" not in env and known.preview:
        # vLLM loads endpoint plugins only from an allow-list; listing every installed plugin keeps the others on.
        plugins = installed_vllm_plugins()
        env["VLLM_PLUGINS"] = ",".join(sorted({*plugins, PLUGIN_NAME}))
    elif "VLLM_PLUGINS" in env and PLUGIN_NAME not in plugins:
        env["VLLM_PLUGINS"] = ",".join([*plugins, PLUGIN_NAME])
    return command, env


def installed_vllm_plugins() -> list[str]:
    """The names of every installed entry point in a ``vllm.*`` group (general, platform, stat logger, ...)."""
    import importlib.metadata as metadata

    return sorted({entry.name for dist in metadata.distributions() for entry in dist.entry_points
                   if entry.group.startswith("vllm.")})


def _limits_from_flags(known: argparse.Namespace) -> dict[str, object]:
    """The client-limit keys from ``--allowed-methods a,b``, ``--budget-range LOW:HIGH``, ``--ratio-range LOW:HIGH``
    and ``--no-client-off`` (checked with the rest by :func:`parse_engine_config`)."""
    limits: dict[str, object] = {}
    if known.allowed_methods is not None:
        limits[ALLOWED_METHODS_KEY] = [name.strip() for name in known.allowed_methods.split(",") if name.strip()]
    for flag, text, key, number in (("--budget-range", known.budget_range, BUDGET_RANGE_KEY, int),
                                    ("--ratio-range", known.ratio_range, RATIO_RANGE_KEY, float)):
        if text is None:
            continue
        try:
            low, high = (number(part) for part in text.split(":"))
        except ValueError:
            raise ConfigError(flag, f"must be LOW:HIGH ({number.__name__}s), got {text!r}") from None
        limits[key] = [low, high]
    if known.client_off is False:
        limits[ALLOW_OFF_KEY] = False
    return limits


def _needs_cpu_kv_default(passthrough: Sequence[str], env: Mapping[str, str]) -> bool:
    if env.get("VLLM_CPU_KVCACHE_SPACE") or any(
        arg.split("=")[0] in ("--kv-cache-memory-bytes", "--gpu-memory-utilization") for arg in passthrough
    ):
        return False
    return is_cpu_build()


THREAD_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
_PARALLEL_FLAGS = {"--tensor-parallel-size": "tp", "-tp": "tp", "--pipeline-parallel-size": "pp", "-pp": "pp",
                   "--data-parallel-size": "dp", "-dp": "dp"}


def parallel_sizes(passthrough: Sequence[str]) -> dict[str, int]:
    """``{"tp", "pp", "dp"}`` from vLLM's flags in ``passthrough`` (``--flag N``, ``--flag=N``; default 1). A value
    that is not an integer is left for vLLM to reject (counted as 1 here)."""
    sizes = {"tp": 1, "pp": 1, "dp": 1}
    args = list(passthrough)
    for index, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if flag not in _PARALLEL_FLAGS:
            continue
        if not equals:
            value = args[index + 1] if index + 1 < len(args) else ""
        try:
            sizes[_PARALLEL_FLAGS[flag]] = max(1, int(value))
        except ValueError:
            pass
    return sizes


def cpu_thread_binding(workers: int, cpus: Sequence[int]) -> str | None:
    """vLLM-CPU's ``VLLM_CPU_OMP_THREADS_BIND`` for ``workers`` local workers: the allowed CPUs in order, split
    into that many contiguous groups (``"0|1"``, ``"0-7|8-15"``); ``None`` when one worker (vLLM's ``auto`` binds
    it) or fewer CPUs than workers (vLLM then says what is wrong).

    vLLM's ``auto`` gives each worker one NUMA node, so on a one-node machine anything above one worker fails with
    "Not enough allowed NUMA nodes to bind threads"; a hand-written list is what vLLM's CPU docs prescribe."""
    cpus = sorted(cpus)
    if workers <= 1 or len(cpus) < workers:
        return None
    share, extra = divmod(len(cpus), workers)
    groups, start = [], 0
    for worker in range(workers):
        size = share + (1 if worker < extra else 0)
        group = cpus[start:start + size]
        start += size
        contiguous = group[-1] - group[0] == len(group) - 1
        groups.append((f"{group[0]}-{group[-1]}" if len(group) > 1 else str(group[0])) if contiguous
                      else ",".join(map(str, group)))
    return "|".join(groups)


def _cpu_thread_binding(passthrough: Sequence[str], env: Mapping[str, str]) -> str | None:
    if env.get(THREAD_BIND_ENV) or not is_cpu_build():
        return None
    sizes = parallel_sizes(passthrough)
    return cpu_thread_binding(sizes["tp"] * sizes["pp"] * sizes["dp"], sorted(os.sched_getaffinity(0)))


def is_cpu_build() -> bool:
    import importlib.metadata as metadata

    try:
        metadata.version("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        return False


def serve(argv: Sequence[str]) -> int:
    try:
        command, env = build_serve_command(argv)
    except ConfigError as error:
        print(f"tokcomp serve: bad configuration: {error}", file=sys.stderr)
        return 2
    print("tokcomp serve:", " ".join(command[2:]), file=sys.stderr, flush=True)
    os.execve(sys.executable, command, env)
    return 0  # not reached


def info() -> int:
    import importlib.metadata as metadata

    import torch

    from .methods import describe
    from .plugin import SUPPORTED_ARCHITECTURES

    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception as error:  # report, don't crash: info is what people run when things are broken
        vllm_version = f"not importable ({error})"
    print(f"vllm-tokcomp {metadata.version('vllm-tokcomp')}")
    print(f"vllm         {vllm_version}")
    print(f"torch        {torch.__version__}")
    print("architectures:", ", ".join(SUPPORTED_ARCHITECTURES))
    print("methods servable through vLLM (fixed budget):", ", ".join(servable_methods()))
    from .integration.support import support_matrix

    print("support matrix (media compressed per model family; the route on Qwen):")
    print(support_matrix(), end="")
    print("all methods in the library:")
    from .methods import available_methods

    for name in available_methods():
        d = describe(name)
        print(f"  {name:16s} {d['family']:14s} {d['paper']}")
    for name in BUNDLED_MODELS:
        model_dir = bundled_model_dir(name)
        state = "built" if (model_dir / "config.json").exists() else f"built on first `tokcomp serve {name}`"
        print(f"bundled model {name}: {model_dir} ({state})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
