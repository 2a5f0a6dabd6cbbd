"""The one interface every compressor implements: decide an assignment, then apply it.

A method looks at the visual tokens of *one* image (or video) and returns a
:class:`TokenAssignment` that says, for every input token, which output token it
went into, or that it was dropped. The same assignment is then applied to
anything that has the token axis: features (size-weighted merge), token sizes
(sum), and positions (each output takes the position of its *anchor*, the input
token that the others merged into). Nothing here imports vLLM.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .knobs import canonical_knobs

DROPPED = -1


@dataclass(frozen=True)
class VisualTokens:
    """The visual tokens of one media item plus the optional signals a method may need.

    Attributes:
        features: ``[N, D]`` token features (e.g. projector outputs).
        grid: the token grid, ``(h, w)`` for an image or ``(t, h, w)`` for a video; its product is N.
        cls_attention: ``[N]`` attention from the CLS token to each patch token, averaged over heads.
        layer_cls_attention: ``[L, N]`` the same for every layer of the tower up to the feature layer (first layer
            first; the last row is the feature layer's, ``cls_attention``).
        keys: ``[N, Dk]`` attention keys of the patch tokens (heads concatenated).
        key_heads: how many heads ``keys`` concatenates (``Dk / key_heads`` each), when known; methods that
            compare head-averaged keys as their papers do (VisionZip, ToMe) read it.
        text_embeds: ``[T, D]`` embeddings of the text query in the feature space of ``features``.
        text_attention: ``[T, N]`` attention from each text token to each visual token, head-averaged.
        sizes: ``[N]`` how many original patches each token already stands for (default: ones).
    """

    features: Tensor
    grid: tuple[int, ...]
    cls_attention: Tensor | None = None
    layer_cls_attention: Tensor | None = None
    keys: Tensor | None = None
    key_heads: int | None = None
    text_embeds: Tensor | None = None
    text_attention: Tensor | None = None
    sizes: Tensor | None = None

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {tuple(self.features.shape)}")
        n = self.features.shape[0]
        if math.prod(self.grid) != n:
            raise ValueError(f"grid {self.grid} holds {math.prod(self.grid)} tokens but features have {n}")
        for name in ("cls_attention", "sizes"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n,):
                raise ValueError(f"{name} must be [{n}], got shape {tuple(value.shape)}")
        if self.layer_cls_attention is not None and (
            self.layer_cls_attention.ndim != 2 or self.layer_cls_attention.shape[1] != n
            or self.layer_cls_attention.shape[0] < 1
        ):
            raise ValueError(f"layer_cls_attention must be [L, {n}], got shape {tuple(self.layer_cls_attention.shape)}")
        if self.keys is not None and (self.keys.ndim != 2 or self.keys.shape[0] != n):
            raise ValueError(f"keys must be [{n}, Dk], got shape {tuple(self.keys.shape)}")
        if self.key_heads is not None:
            if self.keys is None:
                raise ValueError("key_heads was given without keys")
            if isinstance(self.key_heads, bool) or not isinstance(self.key_heads, int) or self.key_heads < 1 \
                    or self.keys.shape[1] % self.key_heads:
                raise ValueError(f"key_heads must be a positive divisor of the key width {self.keys.shape[1]}, "
                                 f"got {self.key_heads!r}")
        if self.text_attention is not None and (
            self.text_attention.ndim != 2 or self.text_attention.shape[1] != n
        ):
            raise ValueError(f"text_attention must be [T, {n}], got shape {tuple(self.text_attention.shape)}")
        if self.text_embeds is not None and self.text_embeds.ndim != 2:
            raise ValueError(f"text_embeds must be [T, D], got shape {tuple(self.text_embeds.shape)}")

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    def token_sizes(self) -> Tensor:
        """Sizes as float32, ones when none were given."""
        if self.sizes is None:
            return torch.ones(self.num_tokens, dtype=torch.float32, device=self.features.device)
        return self.sizes.to(torch.float32)

    def grid_coordinates(self) -> Tensor:
        """``[N, len(grid)]`` integer coordinates of every token in raster order (t, h, w)."""
        axes = [torch.arange(extent, device=self.features.device) for extent in self.grid]
        mesh = torch.meshgrid(*axes, indexing="ij")
        return torch.stack([axis.reshape(-1) for axis in mesh], dim=1)


@dataclass(frozen=True)
class TokenAssignment:
    """Where every input token went.

    Attributes:
        destination: ``[N]`` long; output slot of input token ``i``, or ``DROPPED`` (-1).
        anchor: ``[M]`` long; for every output slot, the input token whose position it takes.
            An anchor is always one of the tokens assigned to that slot.
    """

    destination: Tensor
    anchor: Tensor

    def __post_init__(self) -> None:
        if self.destination.dtype != torch.long or self.anchor.dtype != torch.long:
            raise TypeError("destination and anchor must be int64 tensors")
        m = self.anchor.shape[0]
        if self.destination.numel() and (self.destination.max() >= m or self.destination.min() < DROPPED):
            raise ValueError("destination holds a slot outside [-1, num_outputs)")
        if m and not torch.equal(self.destination[self.anchor], torch.arange(m, device=self.anchor.device)):
            raise ValueError("every anchor must be assigned to its own output slot")

    @property
    def num_inputs(self) -> int:
        return self.destination.shape[0]

    @property
    def num_outputs(self) -> int:
        return self.anchor.shape[0]

    @classmethod
    def identity(cls, n: int, device: torch.device | str | None = None) -> TokenAssignment:
        index = torch.arange(n, device=device)
        return cls(destination=index, anchor=index.clone())

    @classmethod
    def from_kept(cls, kept: Tensor, n: int) -> TokenAssignment:
        """Pure pruning: ``kept`` input indices survive (in the given output order), the rest are dropped."""
        kept = kept.to(torch.long)
        destination = torch.full((n,), DROPPED, dtype=torch.long, device=kept.device)
        destination[kept] = torch.arange(kept.shape[0], device=kept.device)
        return cls(destination=destination, anchor=kept)

    @classmethod
    def from_destination(cls, destination: Tensor, anchor: Tensor) -> TokenAssignment:
        return cls(destination=destination.to(torch.long), anchor=anchor.to(torch.long))

    def kept_mask(self) -> Tensor:
        """``[N]`` bool: input tokens that contribute to some output."""
        return self.destination != DROPPED

    def is_identity(self) -> bool:
        n = self.num_inputs
        return self.num_outputs == n and torch.equal(self.anchor, torch.arange(n, device=self.anchor.device))

    def is_order_preserving(self) -> bool:
        """Outputs appear in the order of their anchors (raster/time order)."""
        return bool((self.anchor[1:] > self.anchor[:-1]).all())

    def merge(self, values: Tensor, weights: Tensor | None = None) -> Tensor:
        """Weighted mean of the rows assigned to each output slot; dropped rows vanish.

        ``weights`` (``[N]``, e.g. token sizes) default to ones. Computed in float32
        and returned in the input dtype.
        """
        if self.is_identity():
            return values
        n = self.num_inputs
        if values.shape[0] != n:
            raise ValueError(f"values have {values.shape[0]} rows, the assignment expects {n}")
        w = torch.ones(n, device=values.device) if weights is None else weights.to(values.device, torch.float32)
        keep = self.kept_mask()
        dest = self.destination[keep]
        flat = values.reshape(n, -1)[keep].to(torch.float32)
        w = w[keep]
        total = torch.zeros(self.num_outputs, flat.shape[1], dtype=torch.float32, device=values.device)
        total.index_add_(0, dest, flat * w[:, None])
        norm = torch.zeros(self.num_outputs, dtype=torch.float32, device=values.device)
        norm.index_add_(0, dest, w)
        merged = total / norm.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        return merged.reshape(self.num_outputs, *values.shape[1:]).to(values.dtype)

    def sum(self, values: Tensor) -> Tensor:
        """Sum of the rows assigned to each output slot (e.g. token sizes)."""
        keep = self.kept_mask()
        out = torch.zeros(self.num_outputs, *values.shape[1:], dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.destination[keep], values[keep])

    def take(self, values: Tensor) -> Tensor:
        """Per output, the row of its anchor: positions, (t, h, w) coordinates, masks."""
        return values[self.anchor.to(values.device)]

    def then(self, later: TokenAssignment) -> TokenAssignment:
        """Compose two stages: ``self`` maps N→M, ``later`` maps M→K; the result maps N→K."""
        if later.num_inputs != self.num_outputs:
            raise ValueError(f"cannot compose {self.num_inputs}->{self.num_outputs} with {later.num_inputs}->...")
        destination = torch.where(
            self.destination == DROPPED,
            self.destination,
            later.destination[self.destination.clamp_min(0)],
        )
        return TokenAssignment(destination=destination, anchor=self.anchor[later.anchor])


@dataclass(frozen=True)
class CompressionResult:
    """Output of a compressor: features, how they came about, and how many patches each stands for."""

    features: Tensor
    assignment: TokenAssignment
    sizes: Tensor

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]


@dataclass(frozen=True)
class Compressor:
    """Base of every method. Subclasses are frozen dataclasses whose fields are the method's knobs.

    A subclass implements :meth:`select` (decide); this base applies the
    decision to the features once, the same way for all methods. Every field
    is declared with :func:`~vllm_tokcomp.methods.knobs.knob` (type and finite
    bounds), so any value reaching a method has been checked and made canonical. Capability
    flags are class attributes so the registry and the vLLM integration can ask
    what a method needs before calling it.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    family: ClassVar[str] = ""  # attention | similarity | query | transformation | baseline | learned
    needs_cls_attention: ClassVar[bool] = False
    needs_layer_cls_attention: ClassVar[bool] = False  # [CLS] attention of every tower layer, not just the last
    needs_keys: ClassVar[bool] = False
    needs_text: ClassVar[bool] = False
    needs_text_attention: ClassVar[bool] = False
    # Signals read when given, not required: keys (else the features), the text embeddings and the LM's
    # text->vision attention.
    uses_keys: ClassVar[bool] = False
    uses_text: ClassVar[bool] = False
    uses_text_attention: ClassVar[bool] = False
    # False: which tokens go where depends on the grid, the budget and the knobs only, never on the content.
    selects_by_content: ClassVar[bool] = True
    prunes: ClassVar[bool] = False
    merges: ClassVar[bool] = False
    order_preserving: ClassVar[bool] = True
    supports_fixed_budget: ClassVar[bool] = True
    adaptive: ClassVar[bool] = False  # offers compress_adaptive() with a content-dependent count

    def __post_init__(self) -> None:
        canonical_knobs(self)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for a combination of knobs that is invalid (each knob's type and
        range are declared with :func:`~vllm_tokcomp.methods.knobs.knob` and checked before this runs)."""

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        """Decide which output slot every token goes to; exactly ``budget`` outputs (budget < N)."""
        raise NotImplementedError

    def merge_weights(self, tokens: VisualTokens) -> Tensor:
        """Weights for averaging tokens that share a slot; size-weighted by default."""
        return tokens.token_sizes()

    @classmethod
    def reads_text(cls) -> bool:
        """Whether the prompt's text (its embeddings or the LM's text->vision attention) can change the result."""
        return cls.needs_text or cls.uses_text or cls.needs_text_attention or cls.uses_text_attention

    @classmethod
    def reads_lm_probe(cls) -> bool:
        """Whether the LM's text->vision attention (the integration's LM probe) is read, required or when given."""
        return cls.needs_text_attention or cls.uses_text_attention

    @classmethod
    def reads_tower_signals(cls) -> bool:
        """Whether the vision tower's [CLS] attention or keys are read, required or when given."""
        return cls.needs_cls_attention or cls.needs_layer_cls_attention or cls.needs_keys or cls.uses_keys

    @classmethod
    def required_signals(cls) -> list[str]:
        """The ``VisualTokens`` fields this method cannot run without."""
        flags = (
            ("cls_attention", cls.needs_cls_attention),
            ("layer_cls_attention", cls.needs_layer_cls_attention),
            ("keys", cls.needs_keys),
            ("text_embeds", cls.needs_text),
            ("text_attention", cls.needs_text_attention),
        )
        return [signal for signal, needed in flags if needed]

    def check_inputs(self, tokens: VisualTokens) -> None:
        missing = [signal for signal in self.required_signals() if getattr(tokens, signal) is None]
        if missing:
            raise ValueError(f"method {self.name!r} needs {', '.join(missing)} but they were not given")

    def __call__(self, tokens: VisualTokens, budget: int) -> CompressionResult:
        budget = check_budget(budget)
        n = tokens.num_tokens
        if budget >= n:
            return self.apply(tokens, TokenAssignment.identity(n, tokens.features.device))
        self.check_inputs(tokens)
        assignment = self.select(tokens, budget)
        if assignment.num_outputs != budget or assignment.num_inputs != n:
            raise RuntimeError(
                f"{type(self).__name__} produced {assignment.num_inputs}->{assignment.num_outputs} tokens, "
                f"expected {n}->{budget}"
            )
        return self.apply(tokens, assignment)

    def apply(self, tokens: VisualTokens, assignment: TokenAssignment) -> CompressionResult:
        sizes = tokens.token_sizes()
        if assignment.is_identity():
            return CompressionResult(tokens.features, assignment, sizes)
        features = assignment.merge(tokens.features, self.merge_weights(tokens))
        return CompressionResult(features, assignment, assignment.sum(sizes))

    def knobs(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class ScorePruner(Compressor):
    """Keep the ``budget`` highest-scoring tokens, in their original order.

    Ties go to the lower index, so the choice is deterministic.
    """

    prunes: ClassVar[bool] = True

    def score(self, tokens: VisualTokens) -> Tensor:
        raise NotImplementedError

    def select(self, tokens: VisualTokens, budget: int) -> TokenAssignment:
        scores = self.score(tokens).to(torch.float32)
        return TokenAssignment.from_kept(top_k_in_order(scores, budget), tokens.num_tokens)


def top_k_in_order(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores (ties: lower index first), sorted ascending."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def check_budget(budget: object) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    if budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget}")
    return budget


def compress_batch(
    method: Compressor, items: Sequence[VisualTokens], budgets: Sequence[int]
) -> list[CompressionResult]:
    """Compress several items, each with its own budget. Items never influence each other."""
    if len(items) != len(budgets):
        raise ValueError(f"{len(items)} items but {len(budgets)} budgets")
    return [method(item, budget) for item, budget in zip(items, budgets, strict=True)]
