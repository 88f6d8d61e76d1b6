"""The test harness's XLA flags (tests/conftest.py): how they merge with a user's."""

from __future__ import annotations

import pytest

import conftest

FAST = " ".join(conftest._FAST_COMPILE_FLAGS)  # pylint: disable=protected-access
merge = conftest._fast_compile_xla_flags  # pylint: disable=protected-access


def test_fast_flags_are_added_after_the_users_own():
  assert merge("", "fast") == FAST
  assert merge("--xla_force_host_platform_device_count=8", "fast") == (
      "--xla_force_host_platform_device_count=8 " + FAST)


def test_a_user_level_or_the_default_choice_is_left_alone():
  assert merge("--xla_backend_optimization_level=3", "fast") == (
      "--xla_backend_optimization_level=3")
  assert merge("--xla_force_host_platform_device_count=8", "default") == (
      "--xla_force_host_platform_device_count=8")
  assert merge("", "default") == ""


def test_an_unknown_choice_names_the_variable():
  with pytest.raises(ValueError, match="FEDJAX_MED_TEST_XLA_OPT must be 'fast' or 'default'"):
    merge("", "O0")
