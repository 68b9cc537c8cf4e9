"""Moving a converted network's coefficients during fine-tuning (Dr2Net's dynamic strategy).

A two-stream conversion starts near the original network (``alpha = 1``, small ``beta``),
where the inverse is ill-conditioned: float32 rounding in the rebuilt activations grows by
about ``1 / beta`` per step, so memory-saving gradients are only approximate. Dr2Net
fine-tunes while moving the coefficients towards ``alpha = 0, beta = 1`` (RevNet's
additive couplings, a well-conditioned inverse), so that training starts from the
pretrained function and ends on a network whose reversible backward is exact to rounding.
:class:`CoefficientSchedule` does that, linearly over a number of steps; it works for
momentum's ``gamma`` the same way. Where each point of the path lies (distance to the
original, reconstruction error, gradient error) is measured in the package README.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from invertible_models.conversion.method import Coefficients

__all__ = ["CoefficientSchedule"]


class CoefficientSchedule:
    """Linear interpolation of coefficients from start to end values over ``steps`` calls
    of :meth:`step` (then held at the end values).

    Args:
        target: a converted network (its ``coefficients``) or its
            :class:`~invertible_models.conversion.Coefficients`.
        steps: the number of :meth:`step` calls from the start values to the end values
            (at least 1).
        **ranges: ``name=(start, end)`` per coefficient, e.g. ``alpha=(1.0, 0.0),
            beta=(0.1, 1.0)``; checked against the method's coefficients and ranges.

    The start values are applied at once. Call :meth:`step` after each optimizer step, as
    a learning-rate scheduler; :meth:`state_dict` and :meth:`load_state_dict` save and
    restore the position (a resumed run continues the same path).
    """

    def __init__(self, target: Any, steps: int, **ranges: tuple[float, float]) -> None:
        coefficients = (
            target if isinstance(target, Coefficients) else getattr(target, "coefficients", None)
        )
        if not isinstance(coefficients, Coefficients):
            raise TypeError(
                "CoefficientSchedule needs a network from make_reversible (or its "
                f"coefficients), got a {type(target).__name__}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if not ranges:
            raise ValueError(
                "CoefficientSchedule needs at least one name=(start, end), e.g. "
                f"{coefficients.names[0]}=(start, end); this method has "
                f"{', '.join(coefficients.names)}"
            )
        for name, pair in ranges.items():
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ValueError(f"{name} must be a (start, end) pair, got {pair!r}")
            # check both ends now rather than halfway through training
            probe = type(coefficients)()
            probe.set(**{name: pair[0]})
            probe.set(**{name: pair[1]})
        self.coefficients = coefficients
        self.steps = steps
        self.ranges = {name: (float(a), float(b)) for name, (a, b) in ranges.items()}
        self.last_step = 0
        self._apply()

    def values(self, step: int | None = None) -> dict[str, float]:
        """The scheduled values at ``step`` (default: the current step)."""
        t = min(max(self.last_step if step is None else step, 0), self.steps) / self.steps
        return {name: a + (b - a) * t for name, (a, b) in self.ranges.items()}

    def step(self) -> None:
        """Advance one step and set the coefficients."""
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        self.coefficients.set(**self.values())

    def state_dict(self) -> dict[str, Any]:
        """The position and the path, as plain data."""
        return {"last_step": self.last_step, "steps": self.steps, "ranges": dict(self.ranges)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of the same path (``ValueError`` otherwise)."""
        ranges = {k: tuple(v) for k, v in state["ranges"].items()}
        if state["steps"] != self.steps or ranges != self.ranges:
            raise ValueError(
                f"this schedule runs {self.ranges} over {self.steps} steps; the state is of "
                f"{ranges} over {state['steps']} steps"
            )
        self.last_step = int(state["last_step"])
        self._apply()
