"""lab/benchmarks/position_probe.py: the linear probe finds position where it is planted and not where it is not, and
the script runs end to end on a model folder through transformers' loader."""

import json

import torch

from lab.benchmarks.position_probe import GRID, main, probe


def test_probe_reads_a_planted_column_and_stays_near_chance_on_noise():
    torch.manual_seed(0)
    images, patches = 8, GRID * GRID
    column = (torch.arange(patches) % GRID)[None].expand(images, -1)
    occupied = torch.rand(images, patches) < 0.2
    noise = torch.randn(images, patches, 32)
    planted = noise.clone()
    planted[..., :GRID] += 4 * torch.nn.functional.one_hot(column, GRID).float()
    assert probe(planted, column, occupied)["object_patches"] > 0.95
    half = (column >= GRID // 2).long()
    assert abs(probe(noise, half, occupied)["all_patches"] - 0.5) < 0.1


def test_script_writes_its_table_for_a_model_folder(tmp_path):
    from vllm_tokcomp.tiny import llava_builder as tiny

    model = tiny.ensure_default_model()
    out = tmp_path / "probe"
    assert main(["--model", str(model), "--images", "4", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    (name, per), = report["models"].items()
    assert name == str(model) and set(per) == {"tower", "projected"}
    for result in per.values():
        assert set(result) == {"left_right", "column"}
        assert all(0.0 <= v <= 1.0 for r in result.values() for v in r.values())
    assert out.with_suffix(".md").read_text().count("| tiny-llava-v1 |") == 2
