"""The README's first command: ``scripts/demo.py`` serves the bundled model with ``tokcomp serve`` (real vLLM server,
``openai`` client) and prints the answers and the saving. Slow: one server start."""

import re
import sys

import pytest

from vllm_tokcomp.data import ANSWER_VOCAB, normalize_answer

from .conftest import REPO, run_process_group


@pytest.mark.slow
def test_demo_serves_compressed_and_prints_the_saving(vllm_env: dict[str, str]) -> None:
    proc = run_process_group([sys.executable, str(REPO / "scripts" / "demo.py"), "--questions", "2"], vllm_env,
                             timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-6000:]
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("question") and "compressed" in line)
    answer_rows = lines[header + 1:header + 3]
    assert len(answer_rows) == 2, out
    for row in answer_rows:  # question, right answer, compressed answer, plain answer: all from the task's vocabulary
        right, compressed, plain = row.split()[-3:]
        assert {normalize_answer(a) for a in (right, compressed, plain)} <= set(ANSWER_VOCAB), row
    # tome at the default budget of 64: exactly 64 of 576 image tokens, the text unchanged, fewer KV blocks
    image = re.search(r"image tokens\s+(\d+)\s+(\d+)", out)
    prompt = re.search(r"prompt tokens\s+(\d+)\s+(\d+)", out)
    blocks = re.search(r"KV blocks held \(block size (\d+)\)\s+(\d+)\s+(\d+)", out)
    assert image and prompt and blocks, out
    assert (int(image[1]), int(image[2])) == (576, 64)
    assert int(prompt[1]) - int(prompt[2]) == 576 - 64
    size, plain_blocks, compressed_blocks = (int(x) for x in blocks.groups())
    for held, prompt_tokens in ((plain_blocks, int(prompt[1])), (compressed_blocks, int(prompt[2]))):
        assert -(-prompt_tokens // size) <= held <= -(-(prompt_tokens + 7) // size)  # + up to 7 generated tokens
    assert compressed_blocks < plain_blocks
