"""Uncompressed accuracy of tiny-LLaVA weights on every test set, through vLLM, the bundled model beside them.

``python lab/benchmarks/splits.py NAME=WEIGHTS [...] [--limit N] [--jobs 2] [--what TEXT] [--out PATH]``

The rule for bundling new weights is "better on both the old and the new splits": this scores the bundled model and
each candidate (exported safetensors in llava-hf names, e.g. a training run's ``model.safetensors``) on the v1 test
split (the bundled model's own), the same 250 scenes drawn by spec v2 exactly, with a training range's rendering
variation (strokes 3-4, sizes, colours, both plurals), with digit strokes 2 and 5 (held out from a ``--strokes 3,4``
run), and on the harder split (accuracy per difficulty), 500 questions each, greedy, as the accuracy harness
(``benchmarks/accuracy.py --methods none``) scores them. Each model is one vLLM engine answering all five sets, in a
process of its own; ``--jobs`` of them run at once, each bound to its own core. Writes ``OUT.json`` and ``OUT.md``
(default ``lab/results/splits``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vllm_tokcomp.bench.accuracy import (  # noqa: E402
    _data_root,
    default_dataset,
    full_image_tokens,
    load_dataset,
    model_or_default,
    run_arms,
    score,
    write_report,
)
from vllm_tokcomp.bench.common import provenance, provenance_line, weights_digest  # noqa: E402

DEFAULT_OUT = REPO / "lab" / "results" / "splits"
VARIED = ["--strokes", "3,4", "--size-jitter", "0.08", "--color-jitter", "16", "--both-spellings"]
# name -> (what it is, data.generate arguments beyond the seed, the folder the questions are in); None: the v1 split
TEST_SETS: dict[str, tuple[str, list[str] | None, str]] = {
    "v1": ("v1 test split (the bundled model's own)", None, "test"),
    "v2": ("spec v2, exact drawing", ["--test", "250", "--spec-version", "2"], "test"),
    "v2-varied": ("spec v2, a training range (strokes 3-4, sizes x0.92-1.08, colours +-16, both plurals)",
                  ["--test", "250", "--spec-version", "2", *VARIED], "test"),
    "strokes-2-5": ("spec v2, digit strokes 2 and 5 (held out from a --strokes 3,4 run)",
                    ["--test", "250", "--spec-version", "2", "--strokes", "2,5"], "test"),
    "harder": ("harder split (dense scenes, 3-4 digit numbers)", ["--hard", "250"], "hard"),
}


def test_set(name: str) -> Path:
    """The folder of test set ``name``'s questions, generated once into the harness's data cache."""
    from vllm_tokcomp.data.generate import main as generate
    from vllm_tokcomp.tiny.files import build_in_place

    _, arguments, folder = TEST_SETS[name]
    if arguments is None:
        return default_dataset()
    out = _data_root() / f"splits-{name}-seed0"
    build_in_place(out, lambda: (out / folder / "questions.jsonl").exists(),
                   lambda tmp: generate([str(tmp), "--seed", "0", *arguments]))
    return out / folder


def answer_all(model: str, limit: int | None) -> dict:
    """One engine's uncompressed answers to every test set: ``{set: score(...) and the predictions}``, each
    prediction as the accuracy harness records its baseline's (``baseline_predictions``)."""
    sets = {name: load_dataset(test_set(name), limit) for name in TEST_SETS}
    records = [record for name in TEST_SETS for record in sets[name]]
    full = full_image_tokens(model, records)
    (answers,), _ = run_arms(model, records, [("none", full, None)], chunk=64, max_tokens=4, progress=False,
                             full=full)
    scores, start = {}, 0
    for name, those in sets.items():
        predictions = answers[start:start + len(those)]
        scores[name] = {**score(those, predictions),
                        "predictions": [{"id": r.get("id"), "answer": r["answer"], "prediction": p}
                                        for r, p in zip(those, predictions, strict=True)]}
        start += len(those)
    return scores


def model_folder(name: str, weights: Path, work: Path) -> Path:
    """A served model folder for ``weights`` (built, so its config follows the weights)."""
    if weights.is_dir():
        return weights
    out = work / f"model-{name}"
    subprocess.run([sys.executable, "-m", "vllm_tokcomp.tiny.llava_builder", str(out), "--weights", str(weights)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", help="NAME=WEIGHTS (exported safetensors or a model folder)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions of each set only")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="engines at once")
    parser.add_argument("--what", default="", help="what the candidates are (the report's first line)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path stem (.json/.md)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # FOLDER=JSON: score one model (child)
    args = parser.parse_args(argv)
    if args.one:
        folder, _, out = args.one.partition("=")
        Path(out).write_text(json.dumps(answer_all(folder, args.limit)))
        return 0
    candidates = []
    for spec in args.models:
        name, _, path = spec.partition("=")
        if not name or not path or not Path(path).exists():
            parser.error(f"want NAME=WEIGHTS with an existing file or folder, got {spec!r}")
        candidates.append((name, Path(path)))
    for name in TEST_SETS:  # generated here once, not by the engines racing
        test_set(name)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="tokcomp-splits-"))
    bundled = Path(model_or_default(None))
    models = [("bundled", bundled)] + [(name, model_folder(name, path, work)) for name, path in candidates]

    def scored(job: int, name: str, folder: Path) -> dict:
        out = work / f"{name}.json"
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(job % (os.cpu_count() or 1))}
        command = [sys.executable, __file__, "--one", f"{folder}={out}", *(["--limit", str(args.limit)]
                                                                          if args.limit else [])]
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(scored, i % max(1, args.jobs), name, folder) for i, (name, folder) in enumerate(models)]
        results = {name: future.result() for (name, _), future in zip(models, futures, strict=True)}
    weights = {name: weights_digest(folder) for name, folder in models}
    report = {"what": args.what, "sets": {name: TEST_SETS[name][0] for name in TEST_SETS},
              "models": {name: {"weights_sha256": weights[name], "scores": results[name]} for name, _ in models},
              "seconds": round(time.perf_counter() - start, 1), "provenance": provenance()}
    write_report(args.out, report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    names = list(report["models"])
    head = f"# Uncompressed accuracy on every test set\n\n{report['what']}\n\n" if report["what"] else (
        "# Uncompressed accuracy on every test set\n\n")
    weights = ", ".join(f"{name} `{model['weights_sha256'][:12]}`" for name, model in report["models"].items())
    lines = [head + f"Greedy, exact match, through vLLM (`lab/benchmarks/splits.py`); weights sha256: {weights}. "
             + provenance_line(report.get("provenance")) + "\n",
             "| test set | questions | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for key, what in report["sets"].items():
        scores = [report["models"][name]["scores"][key] for name in names]
        cells = []
        for one in scores:
            cell = f"{one['accuracy']:.3f}"
            if "per_difficulty" in one:
                cell += " (" + ", ".join(f"{d} {a:.3f}" for d, a in one["per_difficulty"].items()) + ")"
            cells.append(cell)
        lines.append(f"| {what} | {scores[0]['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Per question type:", "", "| test set | type | " + " | ".join(names) + " |",
              "|---|---|" + "---:|" * len(names)]
    for key in report["sets"]:
        types = report["models"][names[0]]["scores"][key]["per_type"]
        for kind in types:
            cells = [f"{report['models'][name]['scores'][key]['per_type'][kind]:.2f}" for name in names]
            lines.append(f"| {key} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
