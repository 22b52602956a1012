"""The TRL version check of epsdpo.integrations.trl (runs without TRL installed)."""

from __future__ import annotations

import pytest

from epsdpo.integrations.trl_version import NEWEST_TESTED, SUPPORTED, check_trl_version


@pytest.mark.parametrize("version", ["0.13.0", "0.29.1", "2.0.0", "2.1.0.dev0"])
def test_a_version_outside_the_supported_range_is_an_import_error_that_says_what_to_install(version):
    with pytest.raises(ImportError) as info:
        check_trl_version(version)
    message = str(info.value)
    assert f"TRL {version} is installed" in message
    assert f">={SUPPORTED[0]},<{SUPPORTED[1]}" in message
    assert 'pip install "epsdpo[trl]"' in message


def test_a_tested_version_passes_silently(recwarn):
    check_trl_version(str(NEWEST_TESTED))
    check_trl_version(str(SUPPORTED[0]))
    assert not recwarn.list


def test_a_newer_untested_minor_version_warns():
    newer = f"{NEWEST_TESTED.major}.{NEWEST_TESTED.minor + 1}.0"
    with pytest.warns(UserWarning, match=f"TRL {newer} is newer than the newest version"):
        check_trl_version(newer)


def test_the_supported_range_is_the_one_pyproject_installs():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    expected = f"trl>={SUPPORTED[0].major}.{SUPPORTED[0].minor},<{SUPPORTED[1].major}"
    assert extras["trl"] == [expected]
    assert expected in extras["dev"]
