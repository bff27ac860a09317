"""Rules of the test suite itself: a missing reference library skips its tests on a developer's
machine, but fails them in CI, where a silently skipped parity test would prove nothing."""

import pytest

from conftest import import_test_extra

ABSENT = "gpt2train_no_such_reference_library"


def test_a_missing_test_extra_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        import_test_extra(ABSENT)


def test_a_missing_test_extra_is_an_error_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ImportError, match=rf"{ABSENT} is not installed but CI=true: install the test extra"):
        import_test_extra(ABSENT)


def test_an_installed_test_extra_is_the_module_itself(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert import_test_extra("json") is __import__("json")
