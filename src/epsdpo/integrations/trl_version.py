"""Which TRL versions :mod:`epsdpo.integrations.trl` supports, checked when it is imported (no TRL import here).

The supported range is the ``trl`` extra in ``pyproject.toml``; the tested versions are the ones the test suite
(``tests/integrations/test_trl.py``) has passed on. A version outside the supported range is an ImportError that
says what to install; a newer 1.x than the newest tested one works if TRL kept the interfaces the tests pin, so it
only warns (run the tests to find out).
"""

from __future__ import annotations

import warnings

from packaging.version import Version

#: ``pip install "epsdpo[trl]"`` installs a TRL in this range (keep in step with pyproject.toml's ``trl`` extra)
SUPPORTED = (Version("1.13.0"), Version("2.0.0"))  # [lower, upper)
#: the newest TRL release the test suite has passed on (it passed on 1.13.0, 1.14.2, 1.15.0 and 1.16.0)
NEWEST_TESTED = Version("1.16.0")
INSTALL = 'pip install "epsdpo[trl]"  (or: pip install "trl>=1.13,<2")'


def check_trl_version(version: str) -> None:
    """Raise ImportError if TRL ``version`` is outside the supported range; warn if it is newer than tested."""
    found = Version(version)
    lower, upper = SUPPORTED
    if not lower <= found < upper:
        raise ImportError(
            f"epsdpo.integrations.trl supports TRL >={lower},<{upper} (tested on {lower} to {NEWEST_TESTED}), but "
            f"TRL {version} is installed. Install a supported version: {INSTALL}. Its EpsilonDPOTrainer overrides "
            "parts of DPOTrainer whose interface changes between major versions."
        )
    if found.release[:2] > NEWEST_TESTED.release[:2]:
        warnings.warn(
            f"TRL {version} is newer than the newest version epsdpo.integrations.trl was tested with "
            f"({NEWEST_TESTED}); run `pytest tests/integrations` to check it, or install "
            f'"trl=={NEWEST_TESTED}".',
            UserWarning,
            stacklevel=2,
        )


def require_trl() -> str:
    """Import TRL and check its version; returns the version. ImportError with the install command if missing."""
    try:
        import trl
    except ImportError as error:
        raise ImportError(f"epsdpo.integrations.trl needs TRL, which is not installed: {INSTALL}") from error
    check_trl_version(trl.__version__)
    return str(trl.__version__)
