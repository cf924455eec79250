"""Multi-tensor primitives for Hessian-vector and meta-gradient products, and the fused pilot step.

Every op works on *lists* of tensors (one entry per parameter) and exists twice: the
C++/CUDA extension op ``torch.ops.fastmeta.<name>`` (``csrc/``) and a plain-PyTorch
twin with the same math; ``backend="auto" | "extension" | "torch"`` picks one
(:mod:`._dispatch`: ``"auto"`` the extension when it is built for the tensors' device and
the inputs are eligible, ``"extension"`` raises naming why it cannot run, ``"torch"`` the
twin).  The layout, one op family per module behind thin public functions:

=======================  ==================================================================
module                   public functions
=======================  ==================================================================
:mod:`._dispatch`        ``extension_ops_available``; backend choice and list checks
:mod:`.multi_tensor`     ``add_scaled_`` (θ += α·v), ``dot``, ``norm`` (deterministic
                         reductions), ``central_difference``, ``all_finite`` (one pass,
                         one host synchronisation), ``clone_all`` (copies in one buffer)
:mod:`.adam`             ``adam_preconditioner`` (``c1·v/(sqrt(s/bc2)+eps)``),
                         ``precondition`` (deprecated frozen-second-moment shim)
:mod:`.pilot`            ``adam_pilot``, ``sgd_pilot`` (``AdamPilot``, ``SgdPilot``): ONE
                         optimizer update, its new state and its exact adjoint (incoming
                         state adjoints included), fused; ``FallbackWarning``
:mod:`.pilot_twin`       their plain-PyTorch twin (``adam_twin``, ``sgd_twin``), usable
                         under autograd: with ``csrc/pilot_math.h`` the ONE home of the
                         optimizer math
:mod:`.torch_optim`      reading ``torch.optim`` (``UpdateRule``, ``read_rule``,
                         ``read_state``) and running a rule (``rule_pilot``, ``rule_twin``)
=======================  ==================================================================

Schemas: ``csrc/fastmeta_ops.cpp`` (and each module's docstring).  This package is the
bottom layer of fastmeta: it imports torch and ``fastmeta._extension`` only (the engine,
the algorithms and the API sit above it; ``tests/test_import_layers.py``).
"""
from __future__ import annotations

from ._dispatch import extension_ops_available
from .adam import adam_preconditioner, precondition
from .multi_tensor import add_scaled_, all_finite, central_difference, clone_all, dot, norm
from .pilot import AdamPilot, FallbackWarning, SgdPilot, adam_pilot, sgd_pilot

__all__ = [
    "add_scaled_",
    "dot",
    "norm",
    "central_difference",
    "all_finite",
    "clone_all",
    "adam_preconditioner",
    "adam_pilot",
    "sgd_pilot",
    "AdamPilot",
    "SgdPilot",
    "FallbackWarning",
    "precondition",
    "extension_ops_available",
]
