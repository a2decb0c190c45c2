"""Rules that choose by platform, applied for the platform the program is lowered for.

``method="auto"``'s rule, kernel mixing's and BranchMixConv's were measured per platform. Asking
``jax.default_backend()`` while tracing answers for the host, not for the program: ``jax.export(...,
platforms=["cuda"])`` on a CPU host, or a ``jit`` of CPU-committed arrays on a GPU machine, would bake in the
wrong platform's choice. :func:`by_platform` stages out each distinct choice with
``jax.lax.platform_dependent`` instead: lowering for one platform keeps only that platform's branch, so the
compiled program is the one that choice alone gives, and a multi-platform export keeps a switch on the
platform that is resolved when the module is compiled. Outside ``jit`` only the running platform's branch is
traced, and a rule met while tracing a branch (kernel mixing's branch calling ``per_sample_conv``) takes that
branch's platform rather than nesting another switch.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, TypeVar

import jax

Choice = TypeVar("Choice")

# The platform whose branch is being traced: "cpu", "default" or None outside any branch.
_branch_platform: contextvars.ContextVar[str | None] = contextvars.ContextVar("branch_platform", default=None)


def by_platform(rule: Callable[[str], Choice], build: Callable[[Choice], Callable[..., Any]]) -> Callable[..., Any]:
    """``build(rule(platform))`` as one function of arrays, ``platform`` being the one the program is
    lowered for.

    Args:
      rule: the choice for a platform. It is asked for ``"cpu"`` and for ``"default"``, which stands for
        every other platform (``jax.lax.platform_dependent``'s name for them): the rules tell CPU from the
        accelerators, whose choices were not measured apart.
      build: the function of arrays (pytrees) that runs a choice.

    Returns:
      ``build`` of the choice, as it is where both platforms choose the same (nothing is traced twice) or
      inside a branch of an enclosing :func:`by_platform`; else a function tracing both choices, of which
      lowering keeps the platform's.
    """
    known = _branch_platform.get()
    if known is not None:
        return build(rule(known))
    on_cpu, elsewhere = rule("cpu"), rule("default")
    if on_cpu == elsewhere:
        return build(on_cpu)
    cpu_branch, default_branch = _branch("cpu", build(on_cpu)), _branch("default", build(elsewhere))
    return lambda *args: jax.lax.platform_dependent(*args, cpu=cpu_branch, default=default_branch)


def _branch(platform: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, traced as the branch for ``platform``."""

    def traced(*args: Any) -> Any:
        token = _branch_platform.set(platform)
        try:
            return fn(*args)
        finally:
            _branch_platform.reset(token)

    return traced
