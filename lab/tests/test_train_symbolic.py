"""The symbolic-image diagnostic (tokcomp_lab.train.symbolic): the label embeddings sit exactly where the image
tokens were, and validation scores the first answer the way the QA stage does."""

import torch

from tokcomp_lab.train.llava import QAEncoder, build_model, first_answers_correct
from tokcomp_lab.train.symbolic import SymbolicPatches, hidden_states, val_batch
from vllm_tokcomp.tiny import llava_builder as tiny


def test_image_tokens_become_the_patch_label_embeddings():
    torch.manual_seed(0)
    model = build_model(tiny.Geometry(text_layers=1)).eval()
    symbols = SymbolicPatches(model.config.text_config.hidden_size, 0.02)
    batch, types = val_batch(QAEncoder(), 0, 0, 2)
    assert len(types) == 2 and batch["patch_labels"].shape == (2, 576, 5)
    ids = batch["input_ids"]
    image = ids == tiny.IMAGE_TOKEN_ID
    assert image.sum(1).tolist() == [576, 576]
    # written out: text embeddings everywhere, each image token replaced by its patch's five label embeddings
    embeds = model.model.language_model.embed_tokens(ids.masked_fill(image, 0)).clone()
    for row in range(2):
        labels = batch["patch_labels"][row]
        for patch, position in enumerate(image[row].nonzero().flatten().tolist()):
            r, c = divmod(patch, 24)
            embeds[row, position] = (symbols.tables["color"].weight[labels[patch, 0]]
                                     + symbols.tables["shape"].weight[labels[patch, 1]]
                                     + symbols.tables["digit"].weight[labels[patch, 2]]
                                     + symbols.tables["row"].weight[r] + symbols.tables["col"].weight[c])
    with torch.no_grad():
        expected = model.model.language_model(inputs_embeds=embeds,
                                              attention_mask=batch["attention_mask"]).last_hidden_state
        got = hidden_states(model, symbols, batch)
    torch.testing.assert_close(got, expected)


def test_first_answers_correct_scores_the_first_answer_and_its_eos_only():
    eos = tiny.EOS_TOKEN_ID
    labels = torch.tensor([[-100, -100, 7, eos, -100, 9, eos],
                           [-100, -100, 7, eos, -100, 9, eos]])
    pred = labels[:, 1:].clone()
    pred[0, 4] = 3  # wrong in the second answer only: still right
    pred[1, 2] = 3  # wrong at the first answer's </s>
    assert first_answers_correct(pred, labels) == [True, False]
