"""Where do the trained tiny LLaVA's wrong answers come from: the tower, finding the object, or earlier turns?

``python lab/benchmarks/binding_probe.py [--model DIR] [--data DIR] [--probe-images 120] [--context-images 100]
[--lookup-images 240] [--word-images 20] [--form-images 120] [--out PATH]``

Six measurements on a model folder (default: the bundled trained tiny LLaVA), through transformers (fp32, eager
attention), on the generator's test split (``--data``, default the accuracy harness's; each scene is rebuilt from
the split's seed and checked against the image file):

* **tower**: can the patch features the projector reads tell an object's shape? A linear probe per patch (fitted on
  ``--probe-images`` training-split scenes, object patches only), then per test object the majority vote of its
  patches; reported over all objects and over the targets of the shape questions the LM gets right / wrong.
* **attention**: each test question whose answer is about objects in the image (shape, presence "yes", counts > 0,
  colour, position), asked alone as served, teacher-forced on the gold answer (greedy exact match): the attention
  mass at the answer's first prediction on the patches of what the question is about, per LM layer (head 0, which
  ``train.llava --look-weight`` supervises, and the mean over heads), split by right and wrong answers; for wrong
  shape answers, how often the most attended object is another one and the answer is that object's shape.
* **context**: the training conversations (16 questions per validation scene, ``train.llava``'s format) scored as
  one multi-turn conversation and as isolated single-turn questions (``--isolated-questions``): turns 2-16 asked
  both ways; a gap means later answers lean on earlier turns, which single-turn serving does not have.
* **question words**: does the state at the answer change at all when only the colour word (or only the shape
  word) of the question changes (``--word-images`` validation scenes)? A word that changes nothing is never read.
* **question forms**: the same object asked about by its colour ("What shape is the red object?") and by its shape
  ("What color is the circle?"), every form about every object it can name unambiguously on ``--form-images``
  validation scenes with two or more objects: per form, the share answered right and head 0's attention on the named
  objects at the answer (mean over the LM layers from the second on). Finding an object by its colour at the level
  of uniform attention over the objects means the LM guesses which object is meant.
* **lookup**: could attention find an object by its colour, or by its shape, at all? For each colour (shape), the
  one query vector that puts the most attention on that colour's (shape's) objects, fitted by gradient ascent on
  half of ``--lookup-images`` validation scenes with two or more objects, scored on the other half: in the tower's
  feature layer, in the LM's input (the projected patches after layer 0's norm), and in head 0's keys (with their
  rotary positions, as a single-turn question's answer sees them, and without them) of every later LM layer. High
  in the input and low in the keys means the information is there and the keys do not carry it in a form one query
  can match at every position; high without the rotary positions and low with them means RoPE is what scrambles it.

Writes ``OUT.json`` and ``OUT.md`` (default ``lab/results/binding-probe``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "lab"
for _path in (LAB, REPO):  # tokcomp_lab from lab/; vllm_tokcomp and lab.benchmarks from the repo root
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from lab.benchmarks.position_probe import FIRST_SCENE, fit_linear  # noqa: E402
from vllm_tokcomp.bench.accuracy import default_dataset, load_dataset, model_or_default  # noqa: E402
from vllm_tokcomp.bench.common import output_file  # noqa: E402

DEFAULT_OUT = LAB / "results" / "binding-probe"


def test_scenes(data: Path, records: list[dict]) -> dict[str, tuple[object, object]]:
    """``image`` -> (the generator's scene behind it, rebuilt from the split's seed and checked pixel for pixel,
    and its ``[1, 3, 336, 336]`` pixel values)."""
    import numpy as np
    from PIL import Image

    from tokcomp_lab.train.llava import pixels
    from vllm_tokcomp.data.generate import scene_rng
    from vllm_tokcomp.data.synth import make_scene, render_scene

    spec = json.loads((data.parent / "spec.json").read_text())
    split = data.name
    scenes = {}
    for record in records:
        if record["image"] in scenes:
            continue
        index = int(Path(record["image"]).stem)
        scene = make_scene(scene_rng(spec["seed"], split, index))
        rendered = render_scene(scene)
        with Image.open(record["image_path"]) as image:
            if not np.array_equal(np.asarray(image.convert("RGB")), np.asarray(rendered)):
                raise SystemExit(f"{record['image_path']} is not scene {index} of the generator's {split!r} split "
                                 f"(seed {spec['seed']}): this probe needs the generator's own data")
        scenes[record["image"]] = (scene, pixels(rendered)[None])
    return scenes


def feature_layer_patches(model, pixel_values):  # noqa: ANN001, ANN201 - torch [B, 576, D]
    import torch

    with torch.no_grad():
        out = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def shape_classifier(model, images: int):  # noqa: ANN001, ANN201 - [N, D] features -> shape index (0 = none)
    """A linear per-patch shape probe on ``images`` training-split scenes' object patches."""
    import torch

    from tokcomp_lab.train.llava import patch_labels, pixels
    from vllm_tokcomp.data.generate import scene_rng
    from vllm_tokcomp.data.synth import make_scene, render_scene

    xs, ys = [], []
    for i in range(images):
        scene = make_scene(scene_rng(0, "train", FIRST_SCENE + i))
        shape = torch.from_numpy(patch_labels(scene)[:, 1])
        features = feature_layer_patches(model, pixels(render_scene(scene))[None])[0]
        xs.append(features[shape > 0])
        ys.append(shape[shape > 0])
    return fit_linear(torch.cat(xs), torch.cat(ys))


def object_shape_votes(model, classify, scene, pixel_values) -> list[str | None]:  # noqa: ANN001
    """Per object of ``scene``: the majority of the probe's shape over its patches (None: it owns no patch)."""
    import numpy as np

    from tokcomp_lab.train.llava import patch_owners
    from vllm_tokcomp.data.spec import SHAPES

    owners = patch_owners(scene)
    predicted = classify(feature_layer_patches(model, pixel_values)[0]).numpy()
    votes = []
    for i in range(len(scene.objects)):
        mine = predicted[owners == i + 1]
        mine = mine[mine > 0]
        votes.append(SHAPES[int(np.bincount(mine).argmax()) - 1] if mine.size else None)
    return votes


def answers_right(predicted, labels: list[int], eos: int) -> list[bool]:  # noqa: ANN001 - torch [T] argmax ids
    """Per answer in ``labels`` (in order, each up to and including its ``</s>``): is the teacher-forced argmax
    right at every one of its tokens (what greedy decoding would emit)?"""
    results, current = [], []
    for p, y in enumerate(labels):
        if y != -100:
            current.append(predicted[p - 1].item() == y)
            if y == eos:
                results.append(all(current))
                current = []
    return results


def single_turn_mask(segments: list[int]):  # noqa: ANN201 - torch [1, 1, T, T] float
    """The attention mask of one packed row of single-turn questions (``QAEncoder.isolated_conversation``'s
    segments), in additive form: eager attention adds a 4-D mask to the scores (a boolean one would mask nothing)."""
    import torch

    from tokcomp_lab.train.llava import segment_attention

    allowed = segment_attention(torch.tensor([segments]), torch.ones(1, len(segments), dtype=torch.bool))
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def answer_with_attention(model, enc, scene, pixel_values, qa: dict) -> dict:  # noqa: ANN001
    """Teacher-forced single-turn answer and, at its first prediction, the attention on each object's patches."""
    import numpy as np
    import torch

    from tokcomp_lab.train.llava import patch_owners

    ids, labels, (start,) = enc.conversation_with_answer_starts([qa])
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([ids]), pixel_values=pixel_values, output_attentions=True)
        predicted = model.lm_head(out.last_hidden_state[0]).argmax(-1)
    answer_length = sum(label != -100 for label in labels)
    first_image = ids.index(enc.image_id)
    owners = patch_owners(scene)
    at_answer = torch.stack([a[0, :, start] for a in out.attentions])  # [layers, heads, T]
    per_object = []
    for i in range(len(scene.objects)):
        columns = first_image + np.flatnonzero(owners == i + 1)
        per_object.append(at_answer[:, :, columns].sum(-1))  # [layers, heads]
    (correct,) = answers_right(predicted, labels, enc.eos)
    return {"correct": correct,
            "said": enc.tok.decode(predicted[start:start + answer_length - 1].tolist()).strip(),
            "per_object": torch.stack(per_object) if per_object else torch.zeros(0, *at_answer.shape[:2])}


def context_gap(model, enc, images: int) -> dict:  # noqa: ANN001
    """Turns 2-16 of ``images`` validation scenes' training conversations: right as multi-turn vs as isolated."""
    import torch

    from tokcomp_lab.train.llava import dense_questions, pixels
    from vllm_tokcomp.data.generate import scene_rng
    from vllm_tokcomp.data.synth import make_scene, render_scene

    def right_answers(ids, labels, pixel_values, **extra) -> list[bool]:  # noqa: ANN001
        with torch.no_grad():
            out = model.model(input_ids=torch.tensor([ids]), pixel_values=pixel_values, **extra)
            predicted = model.lm_head(out.last_hidden_state[0]).argmax(-1)
        return answers_right(predicted, labels, enc.eos)

    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # type -> [n, multi-turn right, isolated right]
    first_turn_same = 0
    for index in range(images):
        rng = scene_rng(0, "val", index)
        scene = make_scene(rng)
        pixel_values = pixels(render_scene(scene))[None]
        qas = dense_questions(scene, rng, 16)
        ids, labels, _ = enc.conversation_with_answer_starts(qas)
        multi = right_answers(ids, labels, pixel_values)
        ids, labels, _, positions, segments = enc.isolated_conversation(qas)
        isolated = right_answers(ids, labels, pixel_values, attention_mask=single_turn_mask(segments),
                                 position_ids=torch.tensor([positions]))
        first_turn_same += multi[0] == isolated[0]
        for qa, m, i in list(zip(qas, multi, isolated, strict=True))[1:]:
            row = tally[qa["type"]]
            row[0], row[1], row[2] = row[0] + 1, row[1] + m, row[2] + i
    tally["all"] = [sum(row[k] for row in list(tally.values())) for k in range(3)]
    return {"images": images, "first_turn_same": f"{first_turn_same}/{images}",
            "turns_2_16": {t: {"n": n, "multi_turn": round(m / n, 3), "isolated": round(i / n, 3)}
                           for t, (n, m, i) in sorted(tally.items())}}


LOOKUP_FIRST_SCENE = 30000  # validation scenes no other measurement here or in lab/benchmarks/heldout.py uses
WORDS_FIRST_SCENE = 40000  # likewise, for question_word_influence

# Question pairs that differ in one word the question names its object by: (what changes, question a, question b).
WORD_SWAPS = (
    ("colour", "What shape is the red object?", "What shape is the blue object?"),
    ("colour", "How many red objects are there?", "How many green objects are there?"),
    ("colour", "Is there a red circle?", "Is there a blue circle?"),
    ("shape", "What color is the circle?", "What color is the square?"),
    ("shape", "How many circles are there?", "How many triangles are there?"),
    ("shape", "Is there a red circle?", "Is there a red square?"),
)


# the scenes of the per-form table in the run log accuracy_training_v13.json (git history, lab/training.md)
FORMS_FIRST_SCENE = WORDS_FIRST_SCENE


def question_forms(scene) -> list[tuple[str, str, str, list[int]]]:  # noqa: ANN001 - synth Scene
    """(form, question, answer, the named objects' indices) for every form about every object of ``scene`` that it
    names unambiguously: by colour (shape and position of the only object of that colour, count of a colour) and by
    shape (colour and position of the only object of that shape, count of a shape). Left / right only as the
    generator asks it: the object at least ``POSITION_MARGIN`` from the centre line."""
    from vllm_tokcomp.data.synth import CENTER, POSITION_MARGIN, _unique

    objects = scene.objects
    forms = []
    # (named by, its attribute, its name, the attribute asked, the form's label, the question, the count question)
    namings = (
        ("by colour", "color", "{} object", "shape", "shape", "What shape is the {}?",
         "How many {} objects are there?"),
        ("by shape", "shape", "{}", "color", "colour", "What color is the {}?", "How many {}s are there?"),
    )
    for by, attribute, noun, asked, label, question, count_question in namings:
        for obj in _unique(objects, lambda o, attribute=attribute: getattr(o, attribute)):
            k, name = objects.index(obj), noun.format(getattr(obj, attribute))
            forms.append((f"{label}, {by}", question.format(name), getattr(obj, asked), [k]))
            if abs(obj.x - CENTER) >= POSITION_MARGIN:
                forms.append((f"position, {by}", f"Is the {name} on the left or the right?",
                              "left" if obj.x < CENTER else "right", [k]))
        for value in sorted({getattr(o, attribute) for o in objects}):
            named = [k for k, o in enumerate(objects) if getattr(o, attribute) == value]
            forms.append((f"count, {by}", count_question.format(value), str(len(named)), named))
    return forms


def question_form_attention(model, enc, images: int) -> dict:  # noqa: ANN001
    """Per form of :func:`question_forms` on the first ``images`` validation scenes from :data:`FORMS_FIRST_SCENE`
    that have two or more objects: n, share right (single-turn, teacher-forced greedy exact match) and head 0's
    attention mass on the named objects at the answer's first prediction, mean over the LM layers from the second on
    (those ``train.llava --look-weight`` supervises)."""
    from tokcomp_lab.train.llava import pixels
    from vllm_tokcomp.data.generate import scene_rng
    from vllm_tokcomp.data.synth import make_scene, render_scene

    tally: dict[str, list] = defaultdict(lambda: [0, 0, 0.0])  # form -> [n, right, head 0 mass]
    for index in range(images):
        scene = make_scene(scene_rng(0, "val", FORMS_FIRST_SCENE + index))
        if len(scene.objects) < 2:
            continue
        pixel_values = pixels(render_scene(scene))[None]
        for form, question, answer, named in question_forms(scene):
            seen = answer_with_attention(model, enc, scene, pixel_values, {"question": question, "answer": answer})
            row = tally[form]
            row[0] += 1
            row[1] += seen["correct"]
            row[2] += float(seen["per_object"][named, 1:, 0].sum(0).mean())
    return {"images": images, "forms": {form: {"n": n, "right": round(right / n, 3), "head0_mass": round(mass / n, 3)}
                                        for form, (n, right, mass) in sorted(tally.items())}}


def answer_state(model, enc, pixel_values, question: str):  # noqa: ANN001, ANN201 - torch [layers + 1, D]
    """The LM's hidden states (its input and every layer's output) at a single-turn question's answer position."""
    import torch

    ids, _, (start,) = enc.conversation_with_answer_starts([{"question": question, "answer": "x"}])
    with torch.no_grad():
        out = model.model(input_ids=torch.tensor([ids]), pixel_values=pixel_values, output_hidden_states=True)
    return torch.stack([state[0, start] for state in out.hidden_states])


def question_word_influence(model, enc, images: int) -> dict:  # noqa: ANN001
    """Does the answer depend on the words a question names its object by? For each pair of :data:`WORD_SWAPS`
    on ``images`` validation scenes, the change of the answer position's state when only that word changes,
    relative to the state's norm, per layer (mean over scenes and pairs): ~0 means the LM never reads that word
    and can only guess which object is meant."""
    import numpy as np
    import torch

    from tokcomp_lab.train.llava import pixels
    from vllm_tokcomp.data.generate import scene_rng
    from vllm_tokcomp.data.synth import make_scene, render_scene

    changes: dict[str, list] = defaultdict(list)
    for index in range(images):
        pixel_values = pixels(render_scene(make_scene(scene_rng(0, "val", WORDS_FIRST_SCENE + index))))[None]
        # a question may be in two pairs ("Is there a red circle?"): one forward each
        states = {question: answer_state(model, enc, pixel_values, question)
                  for question in {q for _, a, b in WORD_SWAPS for q in (a, b)}}
        for word, a, b in WORD_SWAPS:
            changes[word].append((states[a] - states[b]).norm(dim=-1) / states[a].norm(dim=-1).clamp_min(1e-12))
    return {"images": images, "pairs": [list(pair) for pair in WORD_SWAPS],
            **{f"{word}_word_by_layer": np.round(torch.stack(rows).mean(0)[1:].double().numpy(), 3).tolist()
               for word, rows in changes.items()}}


def best_query_mass(keys, targets, fit: int, steps: int = 300) -> float:  # noqa: ANN001 - torch tensors
    """``keys`` ``[S, P, D]``, ``targets`` ``[S, P]`` bool: the mean attention mass (softmax over each scene's ``P``
    keys, scaled by ``1/sqrt(D)``) that the single query fitted (Adam, maximising the mean log mass) on the first
    ``fit`` scenes puts on the targets of the others."""
    import torch

    query = torch.zeros(keys.shape[-1], requires_grad=True)
    optimizer = torch.optim.Adam([query], lr=0.05)
    scale = keys.shape[-1] ** -0.5
    for _ in range(steps):
        mass = (torch.softmax(keys[:fit] @ query * scale, -1) * targets[:fit]).sum(-1)
        loss = -torch.log(mass + 1e-9).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((torch.softmax(keys[fit:] @ query * scale, -1) * targets[fit:]).sum(-1).mean())


def lookup_spaces(model, enc, scenes: list) -> dict:  # noqa: ANN001 - model, QAEncoder, synth scenes
    """Name -> ``[S, 576, D]`` patch vectors a query could be matched against: the tower's feature layer, the LM's
    input after layer 0's norm, and head 0's keys of LM layers 1.. with the rotary positions of a single-turn
    question (what attention matches) and without them (what the keys carry before RoPE turns them)."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from tokcomp_lab.train.llava import pixels
    from vllm_tokcomp.data.synth import render_scene

    lm = model.model.language_model
    ids, _, _ = enc.conversation_with_answer_starts([{"question": "What shape is the red object?", "answer": "x"}])
    first = ids.index(enc.image_id)
    image = slice(first, first + model.config.image_seq_length)
    spaces: dict[str, list] = defaultdict(list)
    for scene in scenes:
        pixel_values = pixels(render_scene(scene))[None]
        spaces["tower feature layer"].append(feature_layer_patches(model, pixel_values)[0])
        with torch.no_grad():
            out = model.model(input_ids=torch.tensor([ids]), pixel_values=pixel_values, output_hidden_states=True)
            cos, sin = lm.rotary_emb(out.hidden_states[0], torch.arange(len(ids))[None])
            spaces["LM input"].append(lm.layers[0].input_layernorm(out.hidden_states[0])[0, image])
            for index in range(1, len(lm.layers)):
                attention = lm.layers[index].self_attn
                hidden = lm.layers[index].input_layernorm(out.hidden_states[index])
                keys = attention.k_proj(hidden)[..., : attention.head_dim][:, None]  # [1, 1, T, d]: head 0
                spaces[f"LM layer {index} head 0 keys, rotary positions left out"].append(keys[0, 0, image])
                _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
                spaces[f"LM layer {index} head 0 keys"].append(keys[0, 0, image])
    return {name: torch.stack(rows) for name, rows in spaces.items()}


def lookup(model, enc, images: int) -> dict:  # noqa: ANN001
    """Per space of :func:`lookup_spaces`: held-out attention mass of the best single query by colour / by shape."""
    import numpy as np
    import torch

    from tokcomp_lab.train.llava import patch_owners
    from vllm_tokcomp.data.generate import scene_rng
    from vllm_tokcomp.data.spec import COLORS, SHAPES
    from vllm_tokcomp.data.synth import make_scene

    scenes = [scene for i in range(images)
              if len((scene := make_scene(scene_rng(0, "val", LOOKUP_FIRST_SCENE + i))).objects) >= 2]
    owners = [patch_owners(scene) for scene in scenes]
    fit = len(scenes) // 2
    torch.manual_seed(0)
    spaces = lookup_spaces(model, enc, scenes)
    # per colour / shape: the scenes where it names some objects but not all (so finding them is a choice), how
    # many of those are in the fitting half, and their target patches
    selections: dict[str, list] = {}
    for attribute, values in (("color", COLORS), ("shape", SHAPES)):
        selections[attribute] = []
        for value in values:
            named = [[i + 1 for i, o in enumerate(scene.objects) if getattr(o, attribute) == value]
                     for scene in scenes]
            keep = [k for k, ids in enumerate(named) if 0 < len(ids) < len(scenes[k].objects)]
            fitted = sum(k < fit for k in keep)
            if 0 < fitted < len(keep):
                targets = torch.from_numpy(np.stack([np.isin(owners[k], named[k]) for k in keep]))
                selections[attribute].append((keep, fitted, targets))
    result = {"images": images, "scenes_with_two_or_more_objects": len(scenes), "spaces": {}}
    for name, keys in spaces.items():
        row = {}
        for attribute, chosen in selections.items():
            masses = [best_query_mass(keys[keep], targets, fitted) for keep, fitted, targets in chosen]
            chance = [float(targets[fitted:].float().mean()) for _, fitted, targets in chosen]
            row[f"by_{attribute}"] = round(float(np.mean(masses)), 3)
            row[f"by_{attribute}_uniform"] = round(float(np.mean(chance)), 3)
        result["spaces"][name] = row
    return result


def load_eager(model_dir: str):  # noqa: ANN201 - (transformers LLaVA, QAEncoder)
    """The model folder through transformers' loader in fp32 with eager attention (SDPA returns no attention weights,
    which every attention measurement here reads) and its question encoder."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from tokcomp_lab.train.llava import QAEncoder

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    return model, QAEncoder(Path(model_dir) / "tokenizer.json")


def run(model_dir: str, data: Path, probe_images: int, context_images: int, limit: int | None = None,
        lookup_images: int = 240, word_images: int = 20, form_images: int = 120) -> dict:
    import numpy as np
    import torch

    from tokcomp_lab.train.llava import question_targets

    records = load_dataset(data, limit)
    scenes = test_scenes(data, records)  # before the model: data it cannot use fails at once
    model, enc = load_eager(model_dir)
    classify = shape_classifier(model, probe_images)
    votes = {image: object_shape_votes(model, classify, scene, pixel_values)
             for image, (scene, pixel_values) in scenes.items()}
    all_votes = [(v, o.shape) for image, (scene, _) in scenes.items()
                 for v, o in zip(votes[image], scene.objects, strict=True) if v is not None]

    layers = model.config.text_config.num_hidden_layers
    mass: dict[tuple[str, bool], list] = defaultdict(list)  # (type, right) -> [layers, 2] per question
    shape_targets: dict[bool, list[bool]] = defaultdict(list)  # right -> tower vote right, per target object
    wrong_shape = {"n": 0, "most_attended_is_another_object": 0, "answer_is_that_objects_shape": 0}
    for record in records:
        scene, pixel_values = scenes[record["image"]]
        targets = [t - 1 for t in question_targets(scene, record["question"])]
        targets = [t for t in targets if t < len(scene.objects)]  # the digit box is not an object
        if not targets:
            continue
        seen = answer_with_attention(model, enc, scene, pixel_values, record)
        on_targets = seen["per_object"][targets].sum(0)  # [layers, heads]
        mass[(record["type"], seen["correct"])].append(torch.stack([on_targets[:, 0], on_targets.mean(1)], 1))
        if record["type"] != "shape":
            continue
        (target,) = targets
        shape_targets[seen["correct"]].append(votes[record["image"]][target] == scene.objects[target].shape)
        if not seen["correct"]:
            # over heads and layers 1.. (layer 0 looks nowhere)
            most = int(seen["per_object"][:, 1:].mean((1, 2)).argmax())
            wrong_shape["n"] += 1
            wrong_shape["most_attended_is_another_object"] += most != target
            wrong_shape["answer_is_that_objects_shape"] += most != target and seen["said"] == scene.objects[most].shape
    attention = {f"{t} {'right' if ok else 'wrong'}": {
        "n": len(rows),
        "head0_by_layer": np.round(torch.stack(rows)[:, :, 0].mean(0).numpy(), 3).tolist(),
        "heads_mean_by_layer": np.round(torch.stack(rows)[:, :, 1].mean(0).numpy(), 3).tolist(),
    } for (t, ok), rows in sorted(mass.items())}
    return {
        "model": model_dir, "data": str(data), "questions": len(records), "layers": layers,
        "tower": {"probe_images": probe_images, "objects": len(all_votes),
                  "object_shape_vote": round(float(np.mean([v == s for v, s in all_votes])), 3),
                  **{f"shape_question_targets_lm_{'right' if ok else 'wrong'}":
                     {"n": len(v), "vote_right": round(float(np.mean(v)), 3)}
                     for ok, v in sorted(shape_targets.items())}},
        "attention": attention, "wrong_shape_answers": wrong_shape,
        **({"context": context_gap(model, enc, context_images)} if context_images else {}),
        **({"lookup": lookup(model, enc, lookup_images)} if lookup_images else {}),
        **({"question_words": question_word_influence(model, enc, word_images)} if word_images else {}),
        **({"question_forms": question_form_attention(model, enc, form_images)} if form_images else {}),
    }


def markdown(report: dict) -> str:
    tower, wrong = report["tower"], report["wrong_shape_answers"]
    lines = [f"# Where the wrong answers come from: {Path(report['model']).name}", "",
             f"{report['questions']} test questions; transformers fp32, single-turn, teacher-forced greedy exact "
             "match.",
             "", "## Tower: a linear shape probe on the feature-layer patches", "",
             f"Fitted on {tower['probe_images']} training scenes; majority vote of each object's patches.", "",
             "| objects | n | vote right |", "|---|---:|---:|",
             f"| all test objects | {tower['objects']} | {tower['object_shape_vote']:.3f} |"]
    for key in ("shape_question_targets_lm_right", "shape_question_targets_lm_wrong"):
        if key in tower:
            label = "targets of shape questions the LM gets " + key.rsplit("_", 1)[1]
            lines.append(f"| {label} | {tower[key]['n']} | {tower[key]['vote_right']:.3f} |")
    lines += ["", "## LM attention at the answer on what the question is about", "",
              "Attention mass on the patches of the question's objects at the answer's first prediction, per layer "
              "(head 0 = the head `--look-weight` supervises / mean of all heads).", "",
              "| question, answer | n | head 0 by layer | all heads by layer |", "|---|---:|---|---|"]
    for key, row in report["attention"].items():
        lines.append(f"| {key} | {row['n']} | {' '.join(f'{v:.2f}' for v in row['head0_by_layer'])} | "
                     f"{' '.join(f'{v:.2f}' for v in row['heads_mean_by_layer'])} |")
    lines += ["", f"Wrong shape answers: {wrong['n']}; the most attended object is another one in "
              f"{wrong['most_attended_is_another_object']}, and the answer is that object's shape in "
              f"{wrong['answer_is_that_objects_shape']}."]
    if "context" in report:
        lines += ["", "## Context: training conversations, turns 2-16, multi-turn vs isolated", "",
                  f"{report['context']['images']} validation scenes (first turns agree: "
                  f"{report['context']['first_turn_same']}).",
                  "", "| type | n | multi-turn | isolated |", "|---|---:|---:|---:|"]
        for t, row in report["context"]["turns_2_16"].items():
            lines.append(f"| {t} | {row['n']} | {row['multi_turn']:.3f} | {row['isolated']:.3f} |")
    if "lookup" in report:
        found = report["lookup"]
        lines += ["", "## Lookup: can one query find objects by colour, or by shape?", "",
                  f"{found['scenes_with_two_or_more_objects']} of {found['images']} validation scenes have two or "
                  "more objects; per colour (shape), the single query that puts the most attention on its objects, "
                  "fitted on half of them, attention mass on the other half (mean over colours / shapes; uniform "
                  "attention in brackets).", "",
                  "| where | by colour | by shape |", "|---|---:|---:|"]
        for name, row in found["spaces"].items():
            lines.append(f"| {name} | {row['by_color']:.2f} ({row['by_color_uniform']:.2f}) | "
                         f"{row['by_shape']:.2f} ({row['by_shape_uniform']:.2f}) |")
    if "question_words" in report:
        words = report["question_words"]
        lines += ["", "## Question words: does the answer depend on the word that names the object?", "",
                  f"{words['images']} validation scenes; pairs of single-turn questions that differ in one colour word "
                  "(\"What shape is the red / blue object?\", counts, presence) or one shape word; the change of the "
                  "answer position's hidden state relative to its norm, after each LM layer (0: the word is not read "
                  "at all).", "", "| word changed | after layer 1, 2, ... |", "|---|---|"]
        for word in ("colour", "shape"):
            lines.append(f"| {word} | {' '.join(f'{v:.3f}' for v in words[f'{word}_word_by_layer'])} |")
    if "question_forms" in report:
        forms = report["question_forms"]
        lines += ["", "## Question forms: finding an object by its colour vs by its shape", "",
                  f"Every form about every object it names unambiguously, on the first {forms['images']} validation "
                  "scenes (those with two or more objects); single-turn, teacher-forced. Head 0's attention on the "
                  "named objects at the answer, mean over the LM layers from the second on.", "",
                  "| form | n | right | head 0 on the named objects |", "|---|---:|---:|---:|"]
        for form, row in forms["forms"].items():
            lines.append(f"| {form} | {row['n']} | {row['right']:.3f} | {row['head0_mass']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="LLaVA model folder (default: the bundled trained tiny LLaVA)")
    parser.add_argument("--data", type=Path, default=None, help="the generator's test split folder (default: the "
                        "accuracy harness's)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--probe-images", type=int, default=120)
    parser.add_argument("--context-images", type=int, default=100,
                        help="validation scenes for the multi-turn vs isolated comparison (0: skip)")
    parser.add_argument("--lookup-images", type=int, default=240, help="validation scenes for the lookup fit (0: skip)")
    parser.add_argument("--word-images", type=int, default=20,
                        help="validation scenes for the question-word influence (0: skip)")
    parser.add_argument("--form-images", type=int, default=120,
                        help="validation scenes for the per-question-form attention (0: skip)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    data = args.data or default_dataset()
    report = run(model_or_default(args.model), data, args.probe_images, args.context_images, args.limit,
                 args.lookup_images, args.word_images, args.form_images)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["command"] = "python lab/benchmarks/binding_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    output_file(args.out, ".json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    output_file(args.out, ".md").write_text(text)
    print(text + f"\nwrote {args.out}.json and .md ({report['seconds']}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
