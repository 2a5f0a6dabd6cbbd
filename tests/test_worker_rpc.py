"""integration/worker_rpc.py: what the workers keep and answer (timings, preview selections), without vLLM."""

import pytest
import torch

from vllm_tokcomp.config import CompressionSpec
from vllm_tokcomp.integration import worker_rpc


@pytest.fixture(autouse=True)
def _empty():
    worker_rpc.drain_timings()
    yield
    worker_rpc.drain_timings()


def spec(method: str) -> CompressionSpec:
    return CompressionSpec(method=method, budget=4)


def test_served_items_are_timed_and_drained_once():
    assert worker_rpc.report_item(spec("tome"), torch.tensor([0, 0, 1]), 0.25)
    assert worker_rpc.report_item(spec("pool"), torch.tensor([0, 1, -1]), 0.5)
    assert worker_rpc.handle(None, "timings", ()) == [("tome", 0.25), ("pool", 0.5)]
    assert worker_rpc.drain_timings() == []


def test_the_buffer_keeps_the_newest_timings_only():
    for i in range(worker_rpc.TIMINGS_KEPT + 5):
        worker_rpc.report_item(spec("tome"), torch.tensor([0]), float(i))
    drained = worker_rpc.drain_timings()
    assert len(drained) == worker_rpc.TIMINGS_KEPT and drained[0][1] == 5.0


def test_a_preview_collects_assignments_and_times_nothing():
    with worker_rpc.capturing_selections() as selections:
        assert not worker_rpc.report_item(spec("tome"), torch.tensor([0, 0, 1, -1]), 0.1)
    assert selections == [[0, 0, 1, -1]]
    assert worker_rpc.drain_timings() == []
    assert worker_rpc.report_item(spec("tome"), torch.tensor([0]), 0.1)  # capturing ended


def test_select_runs_the_models_embedding_on_the_unpacked_inputs():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def embed_multimodal(self, pixel_values, sizes):
            assert pixel_values.dtype == torch.bfloat16 and pixel_values.shape == (1, 3, 2, 2)
            assert [s.tolist() for s in sizes] == [[1, 2], [3]]
            worker_rpc.report_item(spec("cls_topk"), torch.tensor([-1, 0, 1]), 0.1)
            return [pixel_values[0]]

    packed = worker_rpc.pack({"pixel_values": torch.ones(1, 3, 2, 2, dtype=torch.bfloat16),
                              "sizes": [torch.tensor([1, 2]), torch.tensor([3])]})
    assert worker_rpc.handle(Model(), "select", (packed,)) == [[-1, 0, 1]]
    assert worker_rpc.drain_timings() == []


@pytest.mark.parametrize("tensor", [torch.randn(2, 3), torch.arange(6, dtype=torch.uint8).reshape(3, 2),
                                    torch.tensor(7.5, dtype=torch.bfloat16), torch.zeros(0, 4)])
def test_pack_round_trip(tensor):
    [back] = worker_rpc.unpack(worker_rpc.pack({"x": tensor})).values()
    assert back.dtype == tensor.dtype and torch.equal(back, tensor)


def test_unknown_calls_are_refused():
    with pytest.raises(ValueError, match="unknown tokcomp worker call 'drop'"):
        worker_rpc.handle(None, "drop", ())
