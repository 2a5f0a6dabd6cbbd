"""Single-turn accuracy of tiny-LLaVA weights on fresh validation scenes: the yardstick for comparing training runs.

``python lab/benchmarks/heldout.py [NAME=]WEIGHTS [...] [--scenes 600] [--first 20000] [--device cpu] [--out PATH]``

The 500 test questions have a standard error of about 1.8 points, too coarse to tell two training runs apart. This
scores each model on every question type the generator can ask of each of ``--scenes`` validation scenes (indices
``--first`` on, far past what the runs' own validation uses; 600 scenes give 3027 questions, standard error about
0.7 points overall), teacher-forced greedy exact match, each question single-turn as served: all of a scene's
questions are packed after one shared image prefix, each seeing the image and itself only, at the positions it has
when asked alone. Accuracy per question type, and per number of objects in the scene (where binding a colour to
a shape fails, the distractors show).

``WEIGHTS``: a model folder (its ``model.safetensors`` and ``tokenizer.json``), exported safetensors in llava-hf
names, or a training run's ``.pt`` checkpoint; default: the bundled model. ``--tokenizer`` (default: the bundled
model's) is used for bare weights files. Writes ``OUT.json`` and ``OUT.md`` (default ``lab/results/heldout``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "lab"
for _path in (LAB, REPO):  # tokcomp_lab from lab/; vllm_tokcomp and lab.benchmarks from the repo root
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from vllm_tokcomp.bench.accuracy import model_or_default, write_report  # noqa: E402

DEFAULT_OUT = LAB / "results" / "heldout"
FIRST_SCENE = 20000  # validation scenes the training runs never score (their --eval-images take the first few hundred)


def parse_model(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after the file or folder) -> (name, path); the path must exist."""
    name, _, path = spec.rpartition("=")
    where = Path(path)
    if not where.exists():
        raise SystemExit(f"heldout: no such model folder or weights file: {path}")
    return name or (where.name if where.is_dir() else where.stem), where


def load(where: Path, tokenizer: Path | None, device: str):  # noqa: ANN201 - (transformers LLaVA, QAEncoder)
    """The model behind ``where`` in fp32 (eval mode, on ``device``) and the tokenizer its questions are encoded
    with."""
    from tokcomp_lab.train.llava import QAEncoder, build_model, load_llava_hf_state, read_init

    if where.is_dir():
        weights, tokenizer = where / "model.safetensors", where / "tokenizer.json"
    else:
        weights, tokenizer = where, tokenizer or Path(model_or_default(None)) / "tokenizer.json"
    _, state, geometry = read_init(weights)
    model = build_model(geometry)
    load_llava_hf_state(model, state)
    return model.eval().to(device), QAEncoder(tokenizer)


def packed_logits(model, enc, scene, qas: list[dict], device: str):  # noqa: ANN001, ANN201
    """All of ``qas`` packed after one shared image prefix, each seeing the image and itself only: ``(logits
    [T, vocab] on the CPU, labels, each answer's first prediction position)``."""
    import torch

    from lab.benchmarks.binding_probe import single_turn_mask
    from tokcomp_lab.train.llava import pixels
    from vllm_tokcomp.data.synth import render_scene

    ids, labels, starts, positions, segments = enc.isolated_conversation(qas)
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([ids], device=device),
                          pixel_values=pixels(render_scene(scene))[None].to(device),
                          attention_mask=single_turn_mask(segments).to(device),
                          position_ids=torch.tensor([positions], device=device))
        logits = model.lm_head(out.last_hidden_state[0]).float().cpu()
    return logits, labels, starts


def score_scene(model, enc, scene, qas: list[dict], device: str) -> list[bool]:  # noqa: ANN001
    """Per question of ``qas`` about ``scene``: is every token of its answer the teacher-forced argmax, asked
    single-turn (:func:`packed_logits`)?"""
    from lab.benchmarks.binding_probe import answers_right

    logits, labels, _ = packed_logits(model, enc, scene, qas, device)
    return answers_right(logits.argmax(-1), labels, enc.eos)


def evaluate(model, enc, scenes: int, first: int, device: str) -> dict:  # noqa: ANN001
    """Accuracy overall, per question type and per (type, objects in the scene) on ``scenes`` validation scenes."""
    from tqdm import tqdm

    from vllm_tokcomp.data.generate import scene_rng
    from vllm_tokcomp.data.synth import make_questions, make_scene

    tally: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])  # (type, objects) -> [n, right]
    for index in tqdm(range(first, first + scenes), desc="scenes", leave=False):
        rng = scene_rng(0, "val", index)
        scene = make_scene(rng)
        qas = make_questions(scene, rng, 6)
        for qa, right in zip(qas, score_scene(model, enc, scene, qas, device), strict=True):
            row = tally[(qa["type"], len(scene.objects))]
            row[0] += 1
            row[1] += right

    def share(rows: list[list[int]]) -> dict:
        n, right = sum(r[0] for r in rows), sum(r[1] for r in rows)
        return {"accuracy": round(right / n, 3), "n": n}

    types = sorted({t for t, _ in tally})
    counts = sorted({c for _, c in tally})
    overall = share(list(tally.values()))
    p = overall["accuracy"]
    return {
        **overall, "standard_error": round((p * (1 - p) / overall["n"]) ** 0.5, 4),
        "per_type": {t: share([v for (tt, _), v in tally.items() if tt == t]) for t in types},
        "per_objects": {str(c): share([v for (_, cc), v in tally.items() if cc == c]) for c in counts},
        "per_type_and_objects": {t: {str(c): share([tally[(t, c)]]) for c in counts if (t, c) in tally}
                                 for t in types},
    }


def markdown(report: dict) -> str:
    models = report["models"]
    types = sorted({t for m in models.values() for t in m["per_type"]})
    counts = sorted({c for m in models.values() for c in m["per_objects"]}, key=int)
    any_model = next(iter(models.values()))
    lines = [
        f"# Held-out single-turn accuracy ({report['scenes']} validation scenes from index {report['first_scene']}, "
        f"{any_model['n']} questions)", "",
        "Teacher-forced greedy exact match, each question asked alone (isolated packing), fp32 transformers. "
        f"Standard error about {any_model['standard_error']:.3f} overall (binomial).", "",
        *([report["note"], ""] if report.get("note") else []),
        "| model | all | " + " | ".join(types) + " |",
        "|---|---:|" + "---:|" * len(types),
    ]
    for name, m in models.items():
        lines.append(f"| {name} | {m['accuracy']:.3f} | "
                     + " | ".join(f"{m['per_type'][t]['accuracy']:.3f}" for t in types) + " |")
    lines += ["", "## By objects in the scene (all types; shape questions in brackets)", "",
              "| model | " + " | ".join(f"{c} ({any_model['per_objects'][c]['n']} q)" for c in counts) + " |",
              "|---|" + "---:|" * len(counts)]
    for name, m in models.items():
        shape = m["per_type_and_objects"].get("shape", {})
        cells = [f"{m['per_objects'][c]['accuracy']:.3f}"
                 + (f" ({shape[c]['accuracy']:.2f})" if c in shape else "") for c in counts]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", metavar="[NAME=]WEIGHTS",
                        help="model folders or weights files (default: the bundled model)")
    parser.add_argument("--scenes", type=int, default=600)
    parser.add_argument("--first", type=int, default=FIRST_SCENE, help="index of the first validation scene")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json for bare weights files")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--note", default="", help="a line for the report: where the weights came from")
    args = parser.parse_args(argv)
    if args.scenes < 1:
        parser.error("--scenes must be at least 1")
    models = [parse_model(spec) for spec in args.models] or [("bundled", Path(model_or_default(None)))]
    names = [name for name, _ in models]
    if len(set(names)) != len(names):
        parser.error(f"two models share a name: {names}; name them NAME=PATH")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    results = {}
    for name, where in models:
        model, enc = load(where, args.tokenizer, args.device)
        results[name] = {"weights": str(where), **evaluate(model, enc, args.scenes, args.first, args.device)}
        print(f"{name}: {results[name]['accuracy']:.3f} of {results[name]['n']}", flush=True)
    report = {"scenes": args.scenes, "first_scene": args.first, "note": args.note, "models": results,
              "seconds": round(time.time() - start, 1),
              "command": "python lab/benchmarks/heldout.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
