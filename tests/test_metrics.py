"""integration/metrics.py: what a serving processor records, and that other processors record nothing.

The end-to-end check (a real server's /metrics, two API servers) is in tests/e2e/test_parallel.py.
"""

from prometheus_client import REGISTRY

from vllm_tokcomp.integration import metrics


class _Processor:
    def __init__(self, items):
        self.items = items

    def _compressed_items(self, _result):
        return self.items


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_serving_processor_counts_images_tokens_and_opt_outs():
    processor = _Processor([("tome", 576, 64), ("tome", 576, 32), ("pool", 144, 36)])
    metrics.enable_for(processor, "unit-model")
    before = _value("tokcomp_image_tokens_before_total", model="unit-model", method="tome")
    metrics.record_processed(processor, {"tokcomp_method": "tome"}, result=None)
    assert _value("tokcomp_images_total", model="unit-model", method="tome") == 2
    assert _value("tokcomp_image_tokens_before_total", model="unit-model", method="tome") - before == 1152
    assert _value("tokcomp_image_tokens_after_total", model="unit-model", method="tome") == 96
    assert _value("tokcomp_image_kept_fraction_count", model="unit-model", method="pool") == 1
    assert _value("tokcomp_image_kept_fraction_sum", model="unit-model", method="pool") == 0.25
    metrics.record_processed(_Processor([]), {"tokcomp_method": "none"}, result=None)  # not a serving processor
    assert _value("tokcomp_requests_opted_out_total", model="unit-model") == 0
    metrics.record_processed(_with_metrics([]), {"tokcomp_method": "none"}, result=None)
    assert _value("tokcomp_requests_opted_out_total", model="unit-model") == 1


def _with_metrics(items):
    processor = _Processor(items)
    metrics.enable_for(processor, "unit-model")
    return processor
