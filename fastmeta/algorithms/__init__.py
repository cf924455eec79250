"""The algorithms of :func:`fastmeta.meta_step`, one module each, sharing one engine.

Registry ``ALGORITHMS``: name -> module.  Every module defines

* ``HYPERGRADS``: the ``hypergrad`` values it accepts;
* ``NEEDS_QUIZ``: whether it needs a quiz batch;
* ``check_options(ctx)``: consumes and validates its options from ``ctx.options``
  into ``ctx.settings`` (before anything is computed);
* ``run(ctx) -> StepOutput``: computes, checks, then commits through
  ``ctx.transaction`` (see ``fastmeta.algorithms._common``).

=============  ===========================================================
``kd``         plain distillation baseline (:mod:`fastmeta.algorithms.kd`)
``metadistil`` MetaDistil with pilot update (:mod:`fastmeta.algorithms.metadistil`)
``lgtm``       LGTM, teacher first (:mod:`fastmeta.algorithms.lgtm`)
``reptile``    ReptileDistil, layer-wise (:mod:`fastmeta.algorithms.reptile`)
``ikd``        IKD course/exam steps (:mod:`fastmeta.algorithms.ikd`)
=============  ===========================================================
"""
from __future__ import annotations

from fastmeta.algorithms import ikd, kd, lgtm, metadistil, reptile
from fastmeta.engine import HYPERGRAD_METHODS as HYPERGRADS  # defined once, by the engine

ALGORITHMS = {
    "kd": kd,
    "metadistil": metadistil,
    "lgtm": lgtm,
    "reptile": reptile,
    "ikd": ikd,
}

__all__ = ["ALGORITHMS", "HYPERGRADS", "check_hypergrad"]


def check_hypergrad(algorithm: str, hypergrad: str) -> None:
    """``ValueError`` when ``algorithm`` does not accept ``hypergrad``."""
    accepted = ALGORITHMS[algorithm].HYPERGRADS
    if hypergrad not in accepted:
        hint = (
            " ('first_order' is only meaningful for the first-order algorithms 'reptile' and 'ikd')"
            if hypergrad == "first_order"
            else ""
        )
        raise ValueError(
            f"hypergrad={hypergrad!r} is not supported by algorithm={algorithm!r}; it accepts {accepted}{hint}"
        )
