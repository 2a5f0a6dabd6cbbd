"""Diagnostic: does the tiny LM learn the QA task when its image tokens are perfect?

``PYTHONPATH=lab python -m tokcomp_lab.train.symbolic OUT [--steps N] [--text-layers N] ...``

The 576 image tokens are replaced by learned embeddings of each patch's ground-truth labels (colour, shape and
digit of what covers it, as in the tower's per-patch supervision, plus the patch's row and column), so the tower
and the projector are out of the loop. Everything else is the QA stage of :mod:`tokcomp_lab.train.llava`: the
conversation format, the questions (training split, 16 per image as one multi-turn conversation), the LM's
geometry, the optimiser and schedule, and teacher-forced validation on the first question of validation images.
If this LM does not learn the task either, the bottleneck is on the LM's side, not the tower's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokcomp_lab.train.llava import (
    GRID,
    QAEncoder,
    build_model,
    dense_questions,
    first_answers_correct,
    lr_at,
    padded_conversations,
    patch_labels,
    val_question,
)
from vllm_tokcomp.data.generate import scene_rng
from vllm_tokcomp.data.spec import COLORS, DIGITS, SHAPES
from vllm_tokcomp.data.synth import make_scene
from vllm_tokcomp.tiny import llava_builder as tiny


class SymbolicPatches(nn.Module):
    """``[B, 576, 5]`` patch labels (``patch_labels`` order) -> ``[B, 576, dim]`` image tokens: the sum of a
    colour, shape, digit, row and column embedding (the object-centre labels are left out)."""

    def __init__(self, dim: int, std: float) -> None:
        super().__init__()
        sizes = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "digit": len(DIGITS) + 1, "row": GRID,
                 "col": GRID}
        self.tables = nn.ModuleDict({name: nn.Embedding(n, dim) for name, n in sizes.items()})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=std)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        index = torch.arange(GRID * GRID)
        return (self.tables["color"](labels[..., 0]) + self.tables["shape"](labels[..., 1])
                + self.tables["digit"](labels[..., 2]) + self.tables["row"](index // GRID)
                + self.tables["col"](index % GRID))


def batch_of(enc: QAEncoder, scenes_and_qas: list[tuple[object, list[dict]]]) -> dict:
    return {**padded_conversations([enc.conversation(qas) for _, qas in scenes_and_qas]),
            "patch_labels": torch.from_numpy(np.stack([patch_labels(scene) for scene, _ in scenes_and_qas]))}


def train_batch(enc: QAEncoder, seed: int, start: int, n: int, per_image: int) -> dict:
    items = []
    for index in range(start, start + n):
        rng = scene_rng(seed, "train", index)
        scene = make_scene(rng)
        items.append((scene, dense_questions(scene, rng, per_image)))
    return batch_of(enc, items)


def val_batch(enc: QAEncoder, seed: int, start: int, n: int) -> tuple[dict, list[str]]:
    """The validation questions the QA stage checks (:func:`tokcomp_lab.train.llava.val_question`)."""
    items = [val_question(seed, index) for index in range(start, start + n)]
    return batch_of(enc, [(scene, [qa]) for scene, qa in items]), [qa["type"] for _, qa in items]


def hidden_states(model: nn.Module, symbols: SymbolicPatches, batch: dict) -> torch.Tensor:
    lm = model.model.language_model
    ids = batch["input_ids"]
    image = ids == tiny.IMAGE_TOKEN_ID
    embeds = lm.embed_tokens(ids.masked_fill(image, 0))
    embeds = embeds.masked_scatter(image[..., None], symbols(batch["patch_labels"]).to(embeds.dtype))
    return lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokcomp_lab.train.symbolic", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--text-layers", type=int, default=tiny.TEXT_LAYERS)
    parser.add_argument("--questions-per-image", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-images", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(tiny.Geometry(text_layers=args.text_layers))
    embed = model.model.language_model.embed_tokens.weight
    symbols = SymbolicPatches(embed.shape[1], float(embed.detach().std()) / 5 ** 0.5)
    params = [*model.model.language_model.parameters(), *model.lm_head.parameters(), *symbols.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    enc = QAEncoder()
    val = [val_batch(enc, args.seed, i, 16) for i in range(0, args.eval_images, 16)]
    log = open(args.out / "log.jsonl", "a")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, args.steps, args.lr, 30)
        batch = train_batch(enc, args.seed, (step - 1) * args.batch, args.batch, args.questions_per_image)
        hidden = hidden_states(model, symbols, batch)[:, :-1]
        target = batch["labels"][:, 1:]
        sel = target != -100
        loss = F.cross_entropy(model.lm_head(hidden[sel]), target[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec = {"step": step, "loss": round(loss.item(), 4), "s": round(time.perf_counter() - t0, 1)}
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                correct = []
                for vb, types in val:
                    pred = model.lm_head(hidden_states(model, symbols, vb)[:, :-1]).argmax(-1)
                    correct += list(zip(types, first_answers_correct(pred, vb["labels"]), strict=True))
            rec["val_acc"] = round(float(np.mean([c for _, c in correct])), 3)
            rec["per_type"] = {t: round(float(np.mean([c for tt, c in correct if tt == t])), 3)
                               for t in sorted({t for t, _ in correct})}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if step % 10 == 0 or "val_acc" in rec:
            print(rec, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
