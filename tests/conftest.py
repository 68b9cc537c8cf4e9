"""Settings shared by every test directory.

Hypothesis profiles: ``ci`` (what tox sets through ``HYPOTHESIS_PROFILE=ci``) has no
per-example deadline, because a 2-core CI machine running torch has timing noise far above
any deadline worth setting, and a modest number of examples so the suite stays within CI's
time. ``dev`` is Hypothesis' default budget, for a local run. Environments that do not
install Hypothesis (``build``) skip all of this.
"""

from __future__ import annotations

import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the `build` env tests packaging only and installs no hypothesis
    settings = None

if settings is not None:
    settings.register_profile(
        "ci",
        deadline=None,
        max_examples=25,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )
    settings.register_profile("dev", deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
