"""Trained connectors through the real OpenAI server: ``tokcomp serve --connector`` on the trained tiny LLaVA."""

import base64

import openai
import pytest

from vllm_tokcomp.launch import ServerProcess

from .conftest import REPO

pytestmark = pytest.mark.slow

CONNECTORS = REPO / "connectors"
FULL = 576


@pytest.fixture(scope="module")
def test_questions() -> list[dict]:
    import sys

    sys.path.insert(0, str(REPO))
    from vllm_tokcomp.bench.accuracy import default_dataset, load_dataset

    return load_dataset(default_dataset(), 4)


@pytest.fixture(scope="module")
def client(vllm_env, tmp_path_factory):
    from vllm_tokcomp.tiny.llava_builder import ensure_trained_model

    log = tmp_path_factory.mktemp("connector-server") / "server.log"
    args = [str(ensure_trained_model()), "--method", "c_abstractor", "--budget", "16",
            "--connector", str(CONNECTORS / "c_abstractor-16"), "--connector", str(CONNECTORS / "qformer-16"),
            "--max-model-len", "1024", "--served-model-name", "tiny-llava"]
    with ServerProcess(args, env=vllm_env, log_path=log) as running:
        yield running, openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def ask(client, record: dict, mm_kwargs: dict | None = None):
    with open(record["image_path"], "rb") as handle:
        url = "data:image/png;base64," + base64.b64encode(handle.read()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": record["question"]}]
    return client.chat.completions.create(
        model="tiny-llava", messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0.0,
        extra_body={"mm_processor_kwargs": mm_kwargs} if mm_kwargs is not None else None,
    )


def test_server_default_and_per_request_connectors(client, test_questions):
    server, client = client
    for record in test_questions:
        full = ask(client, record, {"tokcomp_method": "none"}).usage.prompt_tokens
        text = full - FULL
        assert ask(client, record).usage.prompt_tokens == text + 16  # the engine's c_abstractor@16
        assert ask(client, record, {"tokcomp_method": "qformer"}).usage.prompt_tokens == text + 16
        assert ask(client, record, {"tokcomp_method": "pool", "tokcomp_budget": 64}).usage.prompt_tokens == text + 64
    assert "tokcomp: compressing images with method=c_abstractor budget=16" in server.log_text()


@pytest.mark.parametrize(
    ("mm_kwargs", "field"),
    [
        ({"tokcomp_method": "c_abstractor", "tokcomp_budget": 32}, "mm_processor_kwargs.tokcomp_budget"),
        ({"tokcomp_method": "pixel_unshuffle"}, "mm_processor_kwargs.tokcomp_method"),  # not listed
        ({"tokcomp_connectors": [str(CONNECTORS / "pixel_unshuffle-16")]}, "mm_processor_kwargs.tokcomp_connectors"),
    ],
)
def test_bad_connector_requests_are_400_and_the_server_keeps_serving(client, test_questions, mm_kwargs, field):
    server, client = client
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, test_questions[0], mm_kwargs)
    assert error.value.status_code == 400 and field in str(error.value)
    assert server.is_healthy()
    assert ask(client, test_questions[0]).choices[0].message.content is not None
