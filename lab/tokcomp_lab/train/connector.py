"""Train a learned compressor as a connector variant of the bundled tiny LLaVA, everything else frozen.

``PYTHONPATH=lab python -m tokcomp_lab.train.connector OUT --method pixel_unshuffle [--time-limit S] ...``

The compressor (:mod:`vllm_tokcomp.methods.learned`) maps the projector's 576 outputs to
``--tokens`` (default 64) tokens that take the image's place in the conversation, at consecutive
positions as the plugin serves a compressed image. Tower, projector and LM stay frozen (LLaVA's
stage-1 recipe with the compressor as the trainable connector), so the compressor is the only
difference from the training-free rows at the same budget. It is trained as a
:class:`~vllm_tokcomp.methods.learned.residual.MeanResidual` started at the mean of each output's
nominal inputs: at step 0 ``pixel_unshuffle`` (blocks) and ``c_abstractor`` (cells) are exactly the
registry's ``pool`` at the same count (3 x 3 blocks at 64 tokens), so what they gain over that row is
what learning adds.

Data: the training split's images and questions, generated on the fly exactly as
:mod:`tokcomp_lab.train.llava` does (each image's questions as one multi-turn conversation; loss on
answer tokens and ``</s>``). Validation: teacher-forced exact match of the first ``--eval-images``
validation questions (greedy emits the answer iff the argmax is right at every answer position).
``OUT/ckpt.pt`` is written every ``--save-every`` steps and a run resumes from it;
``OUT/connector.safetensors`` + ``OUT/connector.json`` (:func:`~vllm_tokcomp.methods.learned.io.load_connector`)
is the result, with the validation curve in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokcomp_lab.train.llava import QAEncoder, first_answers_correct, lr_at, qa_batch, save, val_batch
from vllm_tokcomp.methods import VisualTokens
from vllm_tokcomp.methods.learned.base import LearnedCompressor
from vllm_tokcomp.methods.learned.io import build_connector, save_connector
from vllm_tokcomp.tiny import llava_builder as tiny

GRID = (int(math.isqrt(tiny.NUM_IMAGE_TOKENS)),) * 2  # 24 x 24
TOKEN_COUNTS = tuple(side * side for side in range(1, GRID[0] + 1) if GRID[0] % side == 0 and side < GRID[0])


def connector_kwargs(method: str, dim: int, tokens: int = 64) -> dict:
    """An image connector with ``tokens`` outputs (a square grid whose side divides 24) on the 24 x 24 grid, LM
    width in and out."""
    if tokens not in TOKEN_COUNTS:
        raise ValueError(f"tokens must be one of {TOKEN_COUNTS} (a square grid dividing 24 x 24), got {tokens}")
    side = math.isqrt(tokens)
    if method == "pixel_unshuffle":
        return {"in_dim": dim, "out_dim": dim, "factor": GRID[0] // side}
    if method == "c_abstractor":
        return {"in_dim": dim, "out_dim": dim, "out_grid": [side, side]}
    if method == "qformer":
        return {"in_dim": dim, "out_dim": dim, "num_queries": tokens, "num_heads": 4}
    raise ValueError(f"no connector preset for {method!r}")


def connector_forward(model: nn.Module, connector: LearnedCompressor, batch: dict) -> torch.Tensor:
    """The LM's last hidden states with each image's projected features replaced by the connector's outputs."""
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    outputs = torch.cat([connector(VisualTokens(row, GRID)).features for row in features])
    image_mask = batch["input_ids"] == tiny.IMAGE_TOKEN_ID
    if int(image_mask.sum()) != outputs.shape[0]:
        raise ValueError(f"{int(image_mask.sum())} image placeholders for {outputs.shape[0]} connector outputs")
    embeds = model.model.get_input_embeddings()(batch["input_ids"])
    embeds = embeds.masked_scatter(image_mask[..., None], outputs.to(embeds.dtype))
    return model.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state


def connector_loss(model: nn.Module, connector: LearnedCompressor, batch: dict) -> torch.Tensor:
    """Cross-entropy of the answer tokens (and ``</s>``); the LM head is applied at those positions only."""
    hidden = connector_forward(model, connector, batch)[:, :-1]
    target = batch["labels"][:, 1:]
    sel = target != -100
    return F.cross_entropy(model.lm_head(hidden[sel]), target[sel])


def validation_accuracy(model: nn.Module, connector: LearnedCompressor, batches: list) -> tuple[float, dict]:
    """Teacher-forced exact match over ``batches`` (``(batch, types)`` pairs), overall and per question type."""
    correct: list[tuple[str, bool]] = []
    with torch.no_grad():
        for batch, types in batches:
            pred = model.lm_head(connector_forward(model, connector, batch)[:, :-1]).argmax(-1)
            correct += list(zip(types, first_answers_correct(pred, batch["labels"]), strict=True))
    kinds = sorted({t for t, _ in correct})
    per_type = {t: round(float(np.mean([c for tt, c in correct if tt == t])), 3) for t in kinds}
    return round(float(np.mean([c for _, c in correct])), 3), per_type


def load_frozen_model(model_dir: Path) -> nn.Module:
    """The served model folder through transformers' loader, float32, eval mode, no parameter trainable."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model.requires_grad_(False)


def weights_digest(model_dir: Path) -> str:
    """SHA-256 of the model folder's weights: a connector is only valid for the weights it was trained against."""
    from vllm_tokcomp.tiny.files import sha256

    return sha256(model_dir / "model.safetensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--method", required=True, choices=("pixel_unshuffle", "c_abstractor", "qformer"))
    parser.add_argument("--tokens", type=int, default=64, choices=TOKEN_COUNTS, help="connector outputs per image")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled trained one)")
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--time-limit", type=float, default=0.0, help="stop after this many seconds of training")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--questions-per-image", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="data seed (the generator's --seed)")
    parser.add_argument("--first-image", type=int, default=0, help="training-split index of the first image")
    parser.add_argument("--init-seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--eval-images", type=int, default=384)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = args.model or tiny.ensure_served_model()
    model = load_frozen_model(model_dir)
    enc = QAEncoder(model_dir / "tokenizer.json")
    dim = model.config.text_config.hidden_size
    kwargs = connector_kwargs(args.method, dim, args.tokens)
    torch.manual_seed(args.init_seed)
    connector = build_connector(args.method, kwargs).start_at_mean()
    opt = torch.optim.AdamW(connector.parameters(), lr=args.lr, weight_decay=0.01)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "ckpt.pt"
    step, curve, seconds = 0, [], 0.0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        connector.load_state_dict(ckpt["connector"])
        opt.load_state_dict(ckpt["opt"])
        step, curve, seconds = ckpt["step"], ckpt["curve"], ckpt["seconds"]
        print(f"resumed at step {step}", flush=True)
    val_batches = [val_batch(enc, args.seed, i, 16, placeholders=args.tokens)
                   for i in range(0, args.eval_images, 16)]

    def evaluate() -> None:
        connector.eval()
        acc, per_type = validation_accuracy(model, connector, val_batches)
        connector.train()
        curve.append({"step": step, "acc": acc, "per_type": per_type, "s": round(seconds, 1)})
        print(curve[-1], flush=True)

    def export() -> None:
        spec = {"method": args.method, "kwargs": kwargs, "mean_residual": True, "tokens": args.tokens,
                "model_weights_sha256": weights_digest(Path(model_dir)), "steps": step,
                "images_seen": step * args.batch, "train_seconds": round(seconds, 1),
                "command": "PYTHONPATH=lab python -m tokcomp_lab.train.connector "
                + " ".join(sys.argv[1:] if argv is None else argv),
                "validation": curve,
                "parameters": sum(p.numel() for p in connector.parameters())}
        save_connector(connector, spec, args.out / "connector")

    if not curve:
        evaluate()  # step 0: the mean of each output's inputs (pool at the same count for the grid connectors)
    connector.train()
    log = open(args.out / "log.jsonl", "a")
    started = time.perf_counter() - seconds
    while step < args.steps:
        seconds = time.perf_counter() - started
        if args.time_limit and seconds >= args.time_limit:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, 20, seconds / args.time_limit if args.time_limit else 0)
        batch = qa_batch(enc, args.seed, args.first_image + step * args.batch, args.batch,
                         args.questions_per_image, placeholders=args.tokens)
        loss = connector_loss(model, connector, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(connector.parameters(), 1.0)
        opt.step()
        step += 1
        seconds = time.perf_counter() - started
        if step % 10 == 0:
            log.write(json.dumps({"step": step, "loss": round(loss.item(), 4), "s": round(seconds, 1)}) + "\n")
            log.flush()
        if step % args.eval_every == 0:
            evaluate()
        if step % args.save_every == 0:
            save(ckpt_path, {"connector": connector.state_dict(), "opt": opt.state_dict(), "step": step,
                             "curve": curve, "seconds": seconds})
    if not curve or curve[-1]["step"] != step:
        evaluate()
    save(ckpt_path, {"connector": connector.state_dict(), "opt": opt.state_dict(), "step": step, "curve": curve,
                     "seconds": seconds})
    export()
    log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
