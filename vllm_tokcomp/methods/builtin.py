"""Imports every built-in method module so that each registers itself."""

from . import (  # noqa: F401
    adjacent,
    btp,
    cdpruner,
    cls_topk,
    dart,
    divprune,
    evs,
    mmtok,
    mustdrop,
    mustdrop_stages,
    pool,
    prumerge,
    pumer,
    random,
    scope,
    text_relevance,
    tome,
    uniform,
    visionzip,
    vispruner,
)
