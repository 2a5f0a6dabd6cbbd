"""The training script's per-patch targets: the label map matches the rendered pixels, and patch labels name
the object covering each 14 x 14 patch (the supervision the tower is pre-trained with)."""

import numpy as np
import pytest
import torch

from tokcomp_lab.train.llava import DENSE_TARGETS, MIN_COVER, patch_labels, patch_owners, sincos_positions
from vllm_tokcomp.data.generate import scene_rng
from vllm_tokcomp.data.spec import COLORS, SHAPES
from vllm_tokcomp.data.synth import Obj, Scene, label_map, make_scene, render_scene


def _two_layer_model():
    """transformers' LLaVA with a 2-layer LM and random weights (seed 5): small enough for exact checks."""
    from tokcomp_lab.train.llava import build_model, load_llava_hf_state
    from vllm_tokcomp.tiny import llava_builder as tiny

    model = build_model(tiny.Geometry(text_layers=2))
    load_llava_hf_state(model, tiny.random_state_dict(5))
    return model


def _eager_attentions(model, batch):
    """transformers' own eager attention weights of every LM layer for ``batch``, under its mask (a packed batch's
    boolean ``[B, 1, T, T]`` mask made additive: eager attention adds a 4-D mask) and positions: the independent
    reference for the look terms."""
    model.model.language_model.config._attn_implementation = "eager"
    mask = batch["attention_mask"]
    if mask.dim() == 4:
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    return model.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=mask,
                       position_ids=batch.get("position_ids"), output_attentions=True).attentions


def _plain(objects, digit=None, digit_xy=None):
    params = {"c1": (90, 90, 90), "c2": (90, 90, 90), "dir": 0, "period": 8, "noise_seed": 0}
    return Scene("plain", objects, digit, digit_xy, params)


def test_label_map_covers_exactly_the_painted_pixels():
    for index in range(20):
        scene = make_scene(scene_rng(0, "train", index))
        if scene.background != "plain":
            continue
        pixels, labels = np.asarray(render_scene(scene)), label_map(scene)
        for i, obj in enumerate(scene.objects):
            painted = (pixels == np.array(COLORS[obj.color])).all(-1)
            assert painted[labels == i + 1].all()  # every labelled pixel shows the object's colour
            assert not (painted & (labels == 0)).any()  # and no pixel of that colour is left unlabelled
            assert (labels == i + 1).any()


def test_patch_labels_name_the_object_under_each_patch():
    square = Obj("square", "blue", "large", x=7 * 14 + 7, y=5 * 14 + 7)  # centred on patch (row 5, col 7)
    circle = Obj("circle", "red", "small", x=20 * 14, y=18 * 14)
    scene = _plain([square, circle], digit=7, digit_xy=(14 * 14, 2 * 14))
    labels = patch_labels(scene)
    names = [name for name, _ in DENSE_TARGETS]
    colour, shape, digit, centre_colour, centre_shape = (names.index(n) for n in
                                                         ("color", "shape", "digit", "center_color", "center_shape"))
    at = 5 * 24 + 7
    assert labels[at, colour] == list(COLORS).index("blue") + 1 and labels[at, shape] == SHAPES.index("square") + 1
    assert labels[at, centre_shape] == SHAPES.index("square") + 1
    assert labels[0, colour] == labels[0, shape] == labels[0, digit] == 0  # empty corner
    assert labels[2 * 24 + 14, digit] == 7 + 1  # the digit box's top-left patch
    assert (labels[:, centre_colour] > 0).sum() == 2  # one centre patch per object
    assert labels[(18 * 14) // 14 * 24 + (20 * 14) // 14, centre_colour] == list(COLORS).index("red") + 1


def test_patch_owners_is_the_majority_label_of_each_patch():
    # plain reference: for each 14 x 14 patch, count the pixels of every label and keep the most frequent
    # (the smallest label on a tie) if it covers at least MIN_COVER pixels
    checked = 0
    for index in range(12):
        scene = make_scene(scene_rng(0, "train", index))
        labels = label_map(scene)
        expected = np.zeros(576, np.int64)
        for row in range(24):
            for col in range(24):
                patch = labels[row * 14:(row + 1) * 14, col * 14:(col + 1) * 14].ravel()
                best, best_count = 0, 0
                for value in sorted(set(patch.tolist()) - {0}):
                    count = int((patch == value).sum())
                    if count > best_count:
                        best, best_count = value, count
                expected[row * 24 + col] = best if best_count >= MIN_COVER else 0
        np.testing.assert_array_equal(patch_owners(scene), expected)
        checked += int((expected > 0).sum())
    assert checked > 100  # the scenes do put objects on patches
    assert not patch_owners(_plain([])).any()


def test_sincos_positions_are_distinct_per_patch():
    table = sincos_positions(64)
    assert table.shape == (577, 64) and torch.count_nonzero(table[0]) == 0
    assert len({tuple(row.tolist()) for row in table[1:]}) == 576


def test_deepened_model_computes_what_the_shallow_one_did(tmp_path):
    """A 4-layer LM grown from the 2-layer weights (identity blocks appended) gives the same hidden states,
    and its exported weights build a model folder whose config says 4 layers."""
    import json

    from tokcomp_lab.train.llava import QAEncoder, build_model, deepened, export_state, load_llava_hf_state, qa_batch
    from vllm_tokcomp.tiny import llava_builder as tiny

    state = tiny.random_state_dict(3)
    shallow, deep = build_model(tiny.Geometry(text_layers=2)), build_model(tiny.Geometry(text_layers=4))
    load_llava_hf_state(shallow, state)
    load_llava_hf_state(deep, deepened(state, 4))
    batch = qa_batch(QAEncoder(), 0, 0, 1, 2)
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask")}
    with torch.no_grad():
        a, b = shallow.model(**inputs).last_hidden_state, deep.model(**inputs).last_hidden_state
    assert torch.equal(a, b)
    from safetensors.torch import save_file

    save_file(export_state(deep), str(tmp_path / "w.safetensors"))
    out = tiny.build_tiny_llava(tmp_path / "model", weights=tmp_path / "w.safetensors")
    assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == 4


def test_tower_deepened_keeps_the_features_and_the_feature_layers_cls_attention(tmp_path):
    """A 6-layer tower grown from the 3-layer one (identity blocks before the feature layer) gives the same patch
    features, the same CLS attention in the feature layer (what cls_topk and MustDrop read) and the same CLS
    embedding; its exported weights build a model folder whose config says 6 tower layers."""
    import json

    from tokcomp_lab.train.llava import build_model, export_state, load_llava_hf_state, pixels, tower_deepened
    from vllm_tokcomp.tiny import llava_builder as tiny

    state = tiny.random_state_dict(5)
    shallow, deep = build_model(tiny.Geometry()), build_model(tiny.Geometry(vision_layers=6))
    load_llava_hf_state(shallow, state)
    grown = tower_deepened(state, 6)
    load_llava_hf_state(deep, grown)
    prefix = "vision_tower.vision_model.encoder.layers."
    assert torch.equal(grown[prefix + "4.mlp.fc1.weight"], state[prefix + "1.mlp.fc1.weight"])  # feature layer moved
    assert not grown[prefix + "2.mlp.fc2.weight"].any() and torch.equal(grown[prefix + "2.mlp.fc1.weight"],
                                                                      state[prefix + "0.mlp.fc1.weight"])
    scene = make_scene(np.random.default_rng(2))
    images = pixels(render_scene(scene))[None]
    for model in (shallow, deep):
        model.set_attn_implementation("eager")  # SDPA returns no attention weights
    with torch.no_grad():
        outs = [m.model.vision_tower(pixel_values=images, output_hidden_states=True, output_attentions=True)
                for m in (shallow, deep)]
    a, b = outs
    assert torch.allclose(a.hidden_states[tiny.VISION_FEATURE_LAYER], b.hidden_states[tiny.VISION_FEATURE_LAYER],
                          atol=1e-6)
    assert torch.allclose(a.attentions[tiny.VISION_FEATURE_LAYER], b.attentions[tiny.VISION_FEATURE_LAYER], atol=1e-6)
    assert torch.allclose(a.pooler_output, b.pooler_output, atol=1e-6)
    with pytest.raises(ValueError, match="3 tower layers"):
        tower_deepened(state, 2)
    from safetensors.torch import save_file

    save_file(export_state(deep), str(tmp_path / "w.safetensors"))
    out = tiny.build_tiny_llava(tmp_path / "model", weights=tmp_path / "w.safetensors")
    assert json.loads((out / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 6


def test_question_targets_name_the_objects_a_question_is_about():
    scene = Scene("plain", [Obj("circle", "red", "small", 60, 60), Obj("circle", "blue", "large", 250, 80),
                            Obj("cross", "red", "small", 200, 250)], 7, (20, 280))
    from tokcomp_lab.train.llava import question_targets
    from vllm_tokcomp.data.synth import DIGIT_LABEL

    assert question_targets(scene, "What color is the cross?") == [3]
    assert question_targets(scene, "What shape is the blue object?") == [2]
    assert question_targets(scene, "How many circles are there?") == [1, 2]
    assert question_targets(scene, "How many crosss are there?") == [3]  # the generator's plural (spec v1)
    assert question_targets(scene, "How many red objects are there?") == [1, 3]
    assert question_targets(scene, "Is the red circle on the left or the right?") == [1]
    assert question_targets(scene, "Which is further left, the cross or the circle?") == [1, 2, 3]
    assert question_targets(scene, "Is there a blue cross?") == []
    assert question_targets(scene, "Is there a blue cross?", near_misses=True) == [2, 3]  # the blue one, the cross
    assert question_targets(scene, "Is there a red circle?", near_misses=True) == [1]  # a match: only the match
    assert question_targets(scene, "How many green objects are there?", near_misses=True) == []  # nothing to see
    assert question_targets(scene, "Is there a green square?", near_misses=True) == []
    assert question_targets(scene, "What digit is written in the white box?") == [DIGIT_LABEL]


@pytest.mark.parametrize("type_weights", [None, {"color": 4.0, "count": 0.5}])
def test_look_loss_equals_the_attention_transformers_computes(type_weights):
    """The attention-supervision term recomputes head 0's attention rows from the layers' inputs; it must equal
    -log(mass on the targets) read from transformers' own eager attention weights (with ``--type-weight``, the
    looks' weighted mean)."""
    from tokcomp_lab.train.llava import QAEncoder, qa_batch, qa_loss

    model = _two_layer_model()
    batch = qa_batch(QAEncoder(), 0, 0, 2, 6, type_weights=type_weights)
    assert batch["looks"]
    if type_weights:
        assert len({look[3] for look in batch["looks"]}) > 1  # the weights differ, so the mean is a weighted one
    with torch.no_grad():
        plain, _ = qa_loss(model, batch)
        supervised, _ = qa_loss(model, batch, look_weight=1.0)
        attentions = _eager_attentions(model, batch)
    terms = torch.stack([-torch.log(layer[row, 0, query, cols].sum().clamp_min(1e-6))
                         for layer in attentions[1:] for row, query, cols, _ in batch["looks"]])
    weights = torch.tensor([weight for _ in attentions[1:] for *_, weight in batch["looks"]])
    assert torch.allclose(supervised - plain, (terms * weights).sum() / weights.sum(), rtol=1e-4, atol=1e-5)


def test_answer_token_weights_follow_the_answers_in_order():
    from tokcomp_lab.train.llava import QAEncoder, answer_token_weights

    enc = QAEncoder()
    qas = [{"question": "What shape is the red object?", "answer": "circle"},
           {"question": "How many red objects are there?", "answer": "2"}]
    ids, labels, starts = enc.conversation_with_answer_starts(qas)
    weights = answer_token_weights(labels, [3.0, 0.5])
    assert len(weights) == len(labels)
    for position, (label, weight) in enumerate(zip(labels, weights, strict=True)):
        expected = 0.0 if label == -100 else 3.0 if position <= starts[1] else 0.5
        assert weight == expected
    with pytest.raises(ValueError, match="2 answers in the labels, 3 weights"):
        answer_token_weights(labels, [1.0, 1.0, 1.0])


def test_type_weights_weigh_each_answer_by_its_question_type():
    """The weighted answer loss against a plain reference: the image's questions drawn again the way the
    generator draws them, each answer's tokens weighted by its type, cross-entropy from the model's logits."""
    import torch.nn.functional as F

    from tokcomp_lab.train.llava import (
        QAEncoder,
        dense_questions,
        qa_batch,
        qa_loss,
    )
    from vllm_tokcomp.tiny import llava_builder as tiny

    model = _two_layer_model()
    enc = QAEncoder()
    plain = qa_batch(enc, 0, 7, 1, 8)
    even = qa_batch(enc, 0, 7, 1, 8, type_weights={"shape": 2.0, "count": 2.0, "color": 2.0, "position": 2.0,
                                                       "presence": 2.0, "digit": 2.0})
    type_weights = {"shape": 3.0, "presence": 0.0}
    weighted = qa_batch(enc, 0, 7, 1, 8, type_weights=type_weights)
    assert torch.equal(plain["input_ids"], weighted["input_ids"])
    rng = scene_rng(0, "train", 7)
    scene = make_scene(rng)
    qas = dense_questions(scene, rng, 8)
    assert {qa["type"] for qa in qas} >= {"presence", "shape"}
    with torch.no_grad():
        loss_plain, _ = qa_loss(model, plain)
        loss_even, _ = qa_loss(model, even)
        loss_weighted, _ = qa_loss(model, weighted)
        hidden = model.model(input_ids=plain["input_ids"], pixel_values=plain["pixel_values"],
                             attention_mask=plain["attention_mask"]).last_hidden_state[0, :-1]
        per_token = F.cross_entropy(model.lm_head(hidden), plain["labels"][0, 1:].clamp_min(0), reduction="none")
    labels = plain["labels"][0, 1:].tolist()
    answer, weights = 0, []
    for label in labels:
        weights.append(0.0 if label == -100 else type_weights.get(qas[answer]["type"], 1.0))
        answer += label == tiny.EOS_TOKEN_ID
    weights = torch.tensor(weights)
    assert torch.allclose(loss_even, loss_plain, rtol=1e-5)  # a common factor changes nothing
    assert torch.allclose(loss_weighted, (per_token * weights).sum() / weights.sum(), rtol=1e-5)
    assert not torch.allclose(loss_weighted, loss_plain, rtol=1e-3)
    # looks: presence questions (weight 0) have none left, shape ones carry their weight
    assert {look[3] for look in weighted["looks"]} == {1.0, 3.0}
    assert len(weighted["looks"]) < len(plain["looks"])


def test_type_weight_flag_names_what_is_wrong():
    from tokcomp_lab.train.llava import parse_type_weights

    def fail(message: str) -> None:
        raise SystemExit(message)

    assert parse_type_weights([], fail) is None
    assert parse_type_weights(["shape=3", "presence=0.5"], fail) == {"shape": 3.0, "presence": 0.5}
    for bad in ("shapes=3", "shape=-1", "shape=x", "shape", "shape=inf"):
        with pytest.raises(SystemExit, match=f"--type-weight wants .*got '{bad}'"):
            parse_type_weights([bad], fail)
    with pytest.raises(SystemExit, match="once per type"):
        parse_type_weights(["shape=1", "shape=2"], fail)


def test_min_objects_draws_crowded_scenes_and_one_changes_nothing():
    from tokcomp_lab.train.llava import QAEncoder, qa_batch, training_scene

    enc = QAEncoder()
    counts = [len(make_scene(scene_rng(0, "train", i)).objects) for i in range(40)]
    assert min(counts) < 3  # the generator's own mix has sparse scenes ...
    crowded = [training_scene(scene_rng(0, "train", i), 3) for i in range(40)]
    assert min(len(scene.objects) for scene in crowded) >= 3  # ... which min_objects skips
    # each kept scene is the first crowded one its image's generator draws (the skipped draws are whole scenes)
    rng = scene_rng(0, "train", counts.index(1))
    while len((first := make_scene(rng)).objects) < 3:
        pass
    assert training_scene(scene_rng(0, "train", counts.index(1)), 3) == first
    plain, same = qa_batch(enc, 0, 5, 3, 4), qa_batch(enc, 0, 5, 3, 4, min_objects=1)
    for key in ("input_ids", "labels", "pixel_values", "patch_labels"):
        assert torch.equal(plain[key], same[key])
    assert plain["looks"] == same["looks"]
    assert not torch.equal(qa_batch(enc, 0, 5, 3, 4, min_objects=4)["patch_labels"], plain["patch_labels"])


def test_recenter_projector_is_a_shift_and_scale_of_the_image_tokens():
    from tokcomp_lab.train.llava import build_model, load_llava_hf_state, pixels, recenter_projector
    from vllm_tokcomp.data.synth import render_scene
    from vllm_tokcomp.tiny import llava_builder as tiny

    model = build_model(tiny.Geometry(text_layers=2))
    load_llava_hf_state(model, tiny.random_state_dict(2))
    model.eval()
    image = pixels(render_scene(make_scene(scene_rng(0, "val", 3))))[None]

    def tokens() -> torch.Tensor:
        with torch.no_grad():
            out = model.model.get_image_features(pixel_values=image)
        out = getattr(out, "pooler_output", out)
        return torch.cat(list(out)) if isinstance(out, (list, tuple)) else out.reshape(-1, out.shape[-1])

    before = tokens()
    stats = recenter_projector(model, 0, images=4)
    after = tokens()
    # what the re-parameterisation promises, computed from the unchanged model's outputs: s * (x - mu)
    delta = after[1:] - after[:1]
    assert torch.allclose(delta, stats["scale"] * (before[1:] - before[:1]), rtol=1e-4, atol=1e-4)
    again = recenter_projector(model, 0, images=4)  # already centred: nothing shared left, scale 1
    text_norm = float(model.model.language_model.embed_tokens.weight.detach().norm(dim=-1).mean())
    assert again["shared_norm"] < 1e-3 * text_norm and abs(again["token_norm"] - text_norm) < 1e-3 * text_norm


def test_a_wider_tower_round_trips_through_the_model_folder(tmp_path):
    """Trained variants may change the tower's width/depth and the LM's depth: the builder reads them back
    from the weights and writes a config transformers loads those weights into, strictly."""
    import json

    from transformers import LlavaForConditionalGeneration

    from tokcomp_lab.train.llava import build_model, export_state
    from vllm_tokcomp.tiny import llava_builder as tiny

    geometry = tiny.Geometry(text_layers=3, vision_hidden=96, vision_layers=4, vision_intermediate=384)
    from safetensors.torch import save_file

    save_file(export_state(build_model(geometry)), str(tmp_path / "w.safetensors"))
    out = tiny.build_tiny_llava(tmp_path / "model", weights=tmp_path / "w.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 3
    vision = config["vision_config"]
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["intermediate_size"]) == (96, 4, 384)
    assert vision["num_attention_heads"] == 3  # heads of 32
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert tiny.Geometry.of(tiny.load_external_weights(out)) == geometry


def test_dense_loss_adds_a_term_over_the_patches_that_hold_something():
    """Written out per patch: each head's loss is the class-weighted mean of -log p(label) over all patches
    (empty patches weigh 0.2) plus the plain mean over the labelled patches only, so a target that covers
    one patch in a hundred still gets a full-strength gradient."""
    from tokcomp_lab.train.llava import ClipHeads, dense_loss

    torch.manual_seed(0)
    heads = ClipHeads(8)
    features = torch.randn(2, 50, 8)
    labels = torch.zeros(2, 50, len(DENSE_TARGETS), dtype=torch.long)
    labels[0, 3] = torch.tensor([1, 2, 3, 4, 1])
    labels[1, 7, 2] = 10  # one digit patch in a hundred
    loss, accuracy = dense_loss(heads, features, labels)
    expected = 0.0
    for k, head in enumerate(heads.dense):
        logp = torch.log_softmax(head(features).reshape(100, -1), -1)
        y = labels[..., k].reshape(-1)
        nll = -logp[torch.arange(100), y]
        weight = torch.where(y == 0, 0.2, 1.0)
        expected += (weight * nll).sum() / weight.sum()
        if (y > 0).any():
            expected += nll[y > 0].mean()
    torch.testing.assert_close(loss, expected)
    assert set(accuracy) == {name for name, _ in DENSE_TARGETS}


def test_position_loss_is_the_cross_entropy_of_each_patchs_column_and_row():
    """Written out per patch of a 24 x 24 grid: patch ``i`` (row-major, CLIP's order) is in column ``i % 24`` and
    row ``i // 24``; the loss is the sum of the two heads' mean ``-log p``, plus their mean over the occupied
    patches when given, and a head that has learned the grid scores 1.0."""
    from tokcomp_lab.train.llava import ClipHeads, position_loss

    torch.manual_seed(0)
    heads = ClipHeads(48)
    features = torch.randn(2, 576, 48)
    loss, accuracy = position_loss(heads, features)
    expected = 0.0
    for head, truth in zip(heads.position, ([i % 24 for i in range(576)], [i // 24 for i in range(576)]),
                           strict=True):
        logp = torch.log_softmax(head(features), -1)
        expected += -logp[:, torch.arange(576), torch.tensor(truth)].mean()
    torch.testing.assert_close(loss, expected)
    occupied = torch.zeros(2, 576, dtype=torch.bool)
    occupied[1, [30, 31, 500]] = True
    loss, accuracy = position_loss(heads, features, occupied)
    for head, truth in zip(heads.position, (torch.arange(576) % 24, torch.arange(576) // 24), strict=True):
        nll = -torch.log_softmax(head(features), -1)[:, torch.arange(576), truth]
        expected += nll[occupied].mean()
    torch.testing.assert_close(loss, expected)
    one_hot = torch.zeros(1, 576, 48)
    one_hot[0, torch.arange(576), torch.arange(576) % 24] = 1.0  # column one-hot in the first 24 dims
    one_hot[0, torch.arange(576), 24 + torch.arange(576) // 24] = 1.0  # row one-hot in the next 24
    with torch.no_grad():
        for k, head in enumerate(heads.position):
            head.weight.zero_()
            head.bias.zero_()
            head.weight[torch.arange(24), 24 * k + torch.arange(24)] = 10.0
    assert position_loss(heads, one_hot)[1] == {"column": 1.0, "row": 1.0}


def test_heads_saved_before_the_position_heads_still_load():
    from tokcomp_lab.train.llava import ClipHeads, load_heads

    old = {k: v for k, v in ClipHeads(8).state_dict().items() if not k.startswith("position.")}
    heads = ClipHeads(8)
    load_heads(heads, old)
    assert torch.equal(heads.dense[0].weight, old["dense.0.weight"])
    with pytest.raises(RuntimeError, match="dense.0.weight"):
        load_heads(heads, {k: v for k, v in old.items() if k != "dense.0.weight"})


def test_with_language_side_takes_the_tower_from_one_model_and_the_rest_from_another():
    from tokcomp_lab.train.llava import with_language_side

    tower_model = {"vision_tower.a": torch.zeros(1), "multi_modal_projector.b": torch.zeros(1),
                   "language_model.c": torch.zeros(1)}
    donor = {"vision_tower.a": torch.ones(1), "multi_modal_projector.b": torch.ones(1),
             "language_model.c": torch.ones(1)}
    merged = with_language_side(tower_model, donor)
    assert merged["vision_tower.a"].item() == 0
    assert merged["multi_modal_projector.b"].item() == merged["language_model.c"].item() == 1
    with pytest.raises(ValueError, match="--init-lm"):
        with_language_side(tower_model, {"vision_tower.a": torch.ones(1)})


def test_lr_schedule_decays_by_steps_or_by_time_whichever_is_further():
    from tokcomp_lab.train.llava import lr_at

    assert lr_at(0, 1000, 1.0, 10) == pytest.approx(0.1)  # warm-up
    assert lr_at(10, 1000, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(1000, 1000, 1.0, 10) == pytest.approx(0.1)  # end of the cosine
    assert lr_at(10, 1000, 1.0, 10, time_fraction=1.0) == pytest.approx(0.1)  # out of time: fully decayed
    assert lr_at(10, 1000, 1.0, 10, time_fraction=0.5) == pytest.approx(0.1 + 0.9 * 0.5)  # half the time: midway
    assert lr_at(505, 1000, 1.0, 10, time_fraction=0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # steps further on


def test_qa_batches_from_workers_are_the_single_process_batches():
    from tokcomp_lab.train.llava import QABatches, QAEncoder, qa_batch, qa_batches

    enc = QAEncoder()
    dataset = QABatches(enc, seed=0, first=3, steps=5, batch=1, per_image=2, caption=False)
    assert len(dataset) == 2
    for i, batch in enumerate(qa_batches(dataset, workers=1, pin=False)):
        expected = qa_batch(enc, 0, 3 + i, 1, 2)  # step 3 + i of a 1-image batch starts at image 3 + i
        assert batch["looks"] == expected["looks"]
        for key in ("pixel_values", "input_ids", "labels", "attention_mask", "patch_labels"):
            assert torch.equal(batch[key], expected[key]), key


def test_compressed_rows_feed_the_lm_the_library_methods_tokens_at_consecutive_positions():
    """Compression augmentation: a squeezed row's image tokens are exactly what the library method returns for
    that image's projected features (checked here by building the LM input by hand), at the positions of a
    shortened prompt, and its looks point at the output tokens that hold the looked-at patches."""
    from tokcomp_lab.train.llava import (
        AUGMENT_METHODS,
        QAEncoder,
        qa_batch,
        qa_forward,
    )
    from vllm_tokcomp.methods import VisualTokens, get_method
    from vllm_tokcomp.tiny import llava_builder as tiny

    model = _two_layer_model()
    model.eval()
    batch = qa_batch(QAEncoder(), 0, 6, 9, 3, compress_prob=1.0)  # images 6-14 draw all four methods
    plain = qa_batch(QAEncoder(), 0, 6, 9, 3)
    squeezes = batch["squeeze"]
    assert all(squeezes) and not any(plain["squeeze"])
    assert {s.method for s in squeezes} == set(AUGMENT_METHODS)  # merging ones among them
    for row, squeeze in enumerate(squeezes):  # the same conversation, `budget` image tokens instead of 576
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        ref = plain["input_ids"][row][plain["attention_mask"][row].bool()].tolist()
        assert ids.count(tiny.IMAGE_TOKEN_ID) == squeeze.budget < 576
        assert [t for t in ids if t != tiny.IMAGE_TOKEN_ID] == [t for t in ref if t != tiny.IMAGE_TOKEN_ID]
    with torch.no_grad():
        out, looks = qa_forward(model, batch)
        features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        table = model.model.get_input_embeddings()
        destinations = []
        for row, squeeze in enumerate(squeezes):
            kwargs = {"seed": squeeze.seed} if squeeze.method == "random" else {}
            result = get_method(squeeze.method, **kwargs)(VisualTokens(features[row], (24, 24)), squeeze.budget)
            n = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row, :n]
            embeds = table(ids).clone()
            embeds[ids == tiny.IMAGE_TOKEN_ID] = result.features
            hidden = model.model.language_model(inputs_embeds=embeds[None]).last_hidden_state
            assert torch.allclose(out.last_hidden_state[row, :n], hidden[0], atol=1e-5)
            destinations.append(result.assignment.destination)
    first = int((batch["input_ids"][0] == tiny.IMAGE_TOKEN_ID).nonzero()[0])
    assert looks
    for row, query, cols, _ in batch["looks"]:  # every look now names the slots its patches went to, no others
        slots = {int(destinations[row][c - first]) for c in cols} - {-1}
        got = [c for r, q, c, _ in looks if (r, q) == (row, query)]
        assert got == ([sorted(first + s for s in slots)] if slots else [])
        assert all(first <= c < first + squeezes[row].budget for c in (got[0] if got else []))


def test_draw_squeeze_leaves_the_batches_alone_at_probability_zero():
    from tokcomp_lab.train.llava import AUGMENT_BUDGETS, draw_squeeze

    rng = np.random.default_rng(0)
    assert draw_squeeze(rng, 0.0) is None
    assert rng.random() == np.random.default_rng(0).random()  # nothing was drawn
    draws = [draw_squeeze(np.random.default_rng(i), 0.5) for i in range(200)]
    assert 60 < sum(d is not None for d in draws) < 140
    assert {d.budget for d in draws if d} == set(AUGMENT_BUDGETS)


@pytest.mark.parametrize("value", ["cls_topk:64", "nope:64", "uniform:576", "uniform:0", "uniform"])
def test_eval_squeeze_is_refused_at_startup_naming_the_flag(value, tmp_path, capsys):
    from tokcomp_lab.train.llava import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "run"), "--eval-squeeze", value, "--clip-steps", "0", "--qa-steps", "0"])
    assert exit_info.value.code == 2
    assert "--eval-squeeze" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(("extra", "flag"), [
    (["--vision-layers", "2"], "--vision-layers"),  # shallower than the --init tower (3 layers)
    (["--vision-hidden", "96"], "--vision-hidden"),  # another width than the --init tower (64)
    (["--position-weight", "0.3", "--tower-lr-scale", "0"], "--position-weight"),  # it trains the frozen tower
    (["--look-at-near-misses"], "--look-at-near-misses"),  # look targets with no look loss to use them
    (["--type-weight", "colour=2"], "--type-weight"),  # not a question type (the generator says "color")
    (["--min-objects", "6"], "--min-objects"),  # a scene has at most 5 objects
    (["--min-objects", "0"], "--min-objects"),
])
def test_tower_flags_that_cannot_apply_are_refused_at_startup(extra, flag, tmp_path, capsys):
    from pathlib import Path

    from safetensors.torch import save_file

    from tokcomp_lab.train.llava import main
    from vllm_tokcomp.tiny import llava_builder as tiny

    init = tmp_path / "init.safetensors"
    save_file(tiny.random_state_dict(0), str(init))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "run"), "--init", str(Path(init)), "--clip-steps", "0", "--qa-steps", "0", *extra])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("compress_prob", [0.0, 1.0])
def test_isolated_questions_are_the_single_turn_conversations_served(compress_prob):
    """--isolated-questions packs an image's questions after one image prefix; every answer's logits must equal
    those of that question asked alone (built independently: one single-turn conversation per question, no
    custom mask), for plain and compressed images."""
    from tokcomp_lab.train.llava import (
        QAEncoder,
        dense_questions,
        image_tokens,
        padded_conversations,
        qa_batch,
        qa_forward,
    )

    enc = QAEncoder()
    model = _two_layer_model()
    model.eval()
    packed = qa_batch(enc, 0, 6, 3, 5, compress_prob=compress_prob, isolated=True)
    assert packed["attention_mask"].shape[:2] == (3, 1) and packed["position_ids"].shape == packed["input_ids"].shape
    with torch.no_grad():
        out, _ = qa_forward(model, packed)
        packed_logits = model.lm_head(out.last_hidden_state)
        checked = 0
        for row in range(3):
            rng = scene_rng(0, "train", 6 + row)
            scene = make_scene(rng)
            qas = dense_questions(scene, rng, 5)
            squeeze = packed["squeeze"][row]
            labels = packed["labels"][row]
            answer_at = (labels != -100).nonzero().flatten()  # the answer tokens of all questions, in order
            offset = 0
            for qa in qas:
                ids, lab = enc.conversation([qa], image_tokens(squeeze))
                single = {"pixel_values": packed["pixel_values"][row:row + 1], **padded_conversations([(ids, lab)]),
                          "looks": [], "squeeze": [squeeze]}
                single_out, _ = qa_forward(model, single)
                single_logits = model.lm_head(single_out.last_hidden_state[0])
                single_answer = [i for i, t in enumerate(lab) if t != -100]
                for k, i in enumerate(single_answer):  # the logits predicting each answer token
                    packed_i = int(answer_at[offset + k])
                    assert packed["input_ids"][row, packed_i] == ids[i]
                    assert torch.allclose(packed_logits[row, packed_i - 1], single_logits[i - 1], atol=1e-4)
                    checked += 1
                offset += len(single_answer)
            assert offset == len(answer_at)
    assert checked > 20


def test_look_loss_under_packed_questions_equals_eager_attention_with_that_mask():
    """With --isolated-questions the look term must use the packed mask: -log of the target mass in
    transformers' eager attention weights computed under the same mask and positions."""
    from tokcomp_lab.train.llava import QAEncoder, qa_batch, qa_loss

    model = _two_layer_model()
    batch = qa_batch(QAEncoder(), 0, 0, 2, 6, isolated=True)
    assert batch["looks"]
    with torch.no_grad():
        plain, _ = qa_loss(model, batch)
        supervised, _ = qa_loss(model, batch, look_weight=1.0)
        attentions = _eager_attentions(model, batch)
    expected = torch.stack([-torch.log(layer[row, 0, query, cols].sum().clamp_min(1e-6))
                            for layer in attentions[1:] for row, query, cols, _ in batch["looks"]]).mean()
    assert torch.allclose(supervised - plain, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("isolated", [False, True])
def test_question_looks_point_at_the_words_each_question_names(isolated):
    """Each answer's question look covers exactly the colour and shape words of its own question (read back from
    the question text, not from the token ids the code matched), never an earlier turn's answer."""
    import re

    from tokcomp_lab.train.llava import QAEncoder, dense_questions, qa_batch, training_scene

    enc = QAEncoder()
    batch = qa_batch(enc, 0, 0, 3, 8, isolated=isolated)
    by_answer = {(row, query): cols for row, query, cols, _ in batch["question_looks"]}
    attribute_words = {*COLORS, *SHAPES, *(s + "s" for s in SHAPES)}
    checked = 0
    for row in range(3):
        rng = scene_rng(0, "train", row)
        qas = dense_questions(training_scene(rng, 1), rng, 8)
        ids = batch["input_ids"][row].tolist()
        _, _, starts, *_ = (enc.isolated_conversation(qas) if isolated else enc.conversation_with_answer_starts(qas))
        for qa, start in zip(qas, starts, strict=True):
            named = [w for w in re.findall(r"[a-z]+", qa["question"].lower()) if w in attribute_words]
            cols = by_answer.get((row, start), [])
            assert [enc.tok.decode([ids[c]]).strip() for c in cols] == named, qa["question"]
            assert all(c < start for c in cols)
            checked += bool(named)
    assert checked > 10


@pytest.mark.parametrize("isolated", [False, True])
def test_question_look_loss_equals_first_layer_attention_transformers_computes(isolated):
    """The question-look term is -log of the first layer's head QUESTION_LOOK_HEAD attention mass on the
    question's words, read from transformers' eager attention (same mask and positions)."""
    from tokcomp_lab.train.llava import QUESTION_LOOK_HEAD, QAEncoder, qa_batch, qa_loss

    model = _two_layer_model()
    batch = qa_batch(QAEncoder(), 0, 0, 2, 6, isolated=isolated)
    assert batch["question_looks"]
    with torch.no_grad():
        plain, _ = qa_loss(model, batch)
        supervised, _ = qa_loss(model, batch, question_look_weight=2.0)
        first_layer = _eager_attentions(model, batch)[0]
    expected = torch.stack([-torch.log(first_layer[row, QUESTION_LOOK_HEAD, query, cols].sum())
                            for row, query, cols, _ in batch["question_looks"]]).mean()
    assert torch.allclose(supervised - plain, 2.0 * expected, rtol=1e-4, atol=1e-5)


def test_look_loss_keeps_its_gradient_where_the_head_puts_nothing_on_the_targets():
    """A saturated head (the trained model's layer 0 puts ~e-20 on colour words) must still be pushed: the term
    is finite, far above a clamped -log(1e-6), and its gradient reaches the query projection."""
    from tokcomp_lab.train.llava import QUESTION_LOOK_HEAD, QAEncoder, qa_batch, qa_loss
    from vllm_tokcomp.tiny.llava_builder import TEXT_HEAD_DIM

    model = _two_layer_model()
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight.mul_(3000.0)  # logits in the thousands: softmax mass on any one word underflows to 0
    batch = qa_batch(QAEncoder(), 0, 0, 2, 6)
    plain, _ = qa_loss(model, batch)
    supervised, _ = qa_loss(model, batch, question_look_weight=1.0)
    term = supervised - plain
    assert torch.isfinite(term) and term.item() > 50
    term.backward()
    rows = slice(QUESTION_LOOK_HEAD * TEXT_HEAD_DIM, (QUESTION_LOOK_HEAD + 1) * TEXT_HEAD_DIM)
    assert q_proj.weight.grad[rows].abs().sum() > 0


def test_question_look_weight_is_refused_below_zero(tmp_path, capsys):
    from tokcomp_lab.train.llava import main

    for bad in ("-1", "inf", "nan"):
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / "run"), "--question-look-weight", bad, "--clip-steps", "0", "--qa-steps", "0"])
        assert exit_info.value.code == 2
        assert "--question-look-weight" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_qa_batches_draw_the_spec_version_and_rendering_range_asked_for():
    """``Drawing``: spec v2 scenes are v1's scenes drawn anew; a rendering range changes pixels (digit strokes here)
    and leaves the scenes, questions and answers alone; v1 is the default."""
    from tokcomp_lab.train.llava import Drawing, QAEncoder, main, qa_batch, val_batch
    from vllm_tokcomp.data.synth import RenderingRange

    enc = QAEncoder()
    digit_image = next(i for i in range(40) if make_scene(scene_rng(0, "train", i)).digit is not None)
    v1 = qa_batch(enc, 0, digit_image, 1, 4)
    assert torch.equal(v1["pixel_values"], qa_batch(enc, 0, digit_image, 1, 4, drawing=Drawing())["pixel_values"])
    v2 = qa_batch(enc, 0, digit_image, 1, 4, drawing=Drawing(2))
    wide = qa_batch(enc, 0, digit_image, 1, 4, drawing=Drawing(2, RenderingRange(strokes=(5,))))
    assert not torch.equal(v1["pixel_values"], v2["pixel_values"])
    assert not torch.equal(v2["pixel_values"], wide["pixel_values"])  # 5 px strokes instead of 3
    assert torch.equal(v2["labels"], wide["labels"]) and torch.equal(v2["input_ids"], wide["input_ids"])
    v2_val, _ = val_batch(enc, 0, 0, 4, spec_version=2)
    assert not torch.equal(v2_val["pixel_values"], val_batch(enc, 0, 0, 4)[0]["pixel_values"])
    with pytest.raises(SystemExit):
        main(["/tmp/unused-run", "--strokes", "2"])  # rendering variation is spec v2's


def test_hard_share_draws_harder_split_scenes_from_their_own_stream():
    """``--hard-share``: share 0 leaves spec v2's batches alone; share 1 makes every image the scene the image's
    ``hard_train`` generator draws (never the harder split's test scene of that index), drawn and asked as
    ``data/hard.py`` draws and asks them, the answers intact through the tokenizer; the number question has no
    look target (the box has no label)."""
    from tokcomp_lab.train.llava import HARD_TRAIN_SPLIT, Drawing, QAEncoder, hard_scene_rng, main, pixels, qa_batch
    from vllm_tokcomp.data.hard import make_hard_questions, make_hard_scene, render_hard_scene

    enc = QAEncoder()
    v2 = qa_batch(enc, 0, 3, 2, 6, drawing=Drawing(2))
    none = qa_batch(enc, 0, 3, 2, 6, drawing=Drawing(2, hard_share=0.0))
    for key in ("input_ids", "labels", "pixel_values", "patch_labels"):
        assert torch.equal(v2[key], none[key])
    assert hard_scene_rng(0, 3, 0.0) is None
    drawn = [hard_scene_rng(0, i, 0.5) is not None for i in range(200)]
    assert 70 < sum(drawn) < 130  # about half, decided per image

    index = 9  # a scene with a number box
    batch = qa_batch(enc, 0, index, 1, 6, drawing=Drawing(2, hard_share=1.0), near_misses=True)
    rng = scene_rng(0, HARD_TRAIN_SPLIT, index)
    rng.random()  # the share draw
    scene = make_hard_scene(rng)
    qas = make_hard_questions(scene, rng, 6)
    assert 8 <= len(scene.objects) <= 16
    assert torch.equal(batch["pixel_values"][0], pixels(render_hard_scene(scene)))
    assert scene != make_hard_scene(scene_rng(0, "hard", index))  # not the test split's scene
    labels = batch["labels"][0]
    answers = enc.tok.decode([t for t in labels.tolist() if t != -100]).split("</s>")
    assert [a.strip() for a in answers if a.strip()] == [qa["answer"] for qa in qas]
    looked = {start for _row, start, _patches, _weight in batch["looks"]}
    starts = enc.conversation_with_answer_starts(qas)[2]
    for qa, start in zip(qas, starts, strict=True):
        if qa["type"] == "number":
            assert start not in looked
    assert "number" in [qa["type"] for qa in qas]
    assert any(qa["type"] != "number" and start in looked for qa, start in zip(qas, starts, strict=True))

    for flags in (["--hard-share", "0.5"], ["--spec-version", "2", "--hard-share", "1.5"]):
        with pytest.raises(SystemExit):
            main(["/tmp/unused-run", *flags])


def test_v1_share_draws_some_spec_v2_training_images_exactly_as_spec_v1():
    """``--v1-share``: share 0 leaves spec v2's batches alone; share 1 draws and words every image as a spec-v1 run
    does (same pixels, ids and labels), rendering variation and all; which images are v1 is decided per image from a
    stream of its own, so the scenes stay those of the v2 run."""
    from tokcomp_lab.train.llava import Drawing, QAEncoder, drawn_as_v1, main, qa_batch
    from vllm_tokcomp.data.synth import RenderingRange

    enc = QAEncoder()
    varied = RenderingRange((3, 4), 0.08, 16, True)
    v2 = qa_batch(enc, 0, 3, 4, 6, drawing=Drawing(2, varied))
    for key, value in qa_batch(enc, 0, 3, 4, 6, drawing=Drawing(2, varied, v1_share=0.0)).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(v2[key], value), key
    v1 = qa_batch(enc, 0, 3, 4, 6)
    as_v1 = qa_batch(enc, 0, 3, 4, 6, drawing=Drawing(2, varied, v1_share=1.0))
    for key in ("input_ids", "labels", "pixel_values", "patch_labels"):
        assert torch.equal(v1[key], as_v1[key]), key
    assert not torch.equal(v1["pixel_values"], v2["pixel_values"])
    drawn = [drawn_as_v1(0, i, 0.25) for i in range(400)]
    assert 60 < sum(drawn) < 140  # about a quarter
    assert not any(drawn_as_v1(0, i, 0.0) for i in range(50))

    for flags in (["--v1-share", "0.5"], ["--spec-version", "2", "--v1-share", "-0.1"],
                  ["--spec-version", "2", "--v1-share", "nan"]):
        with pytest.raises(SystemExit):
            main(["/tmp/unused-run", *flags])
