"""The test suite runs Ultralytics against a settings folder of its own (conftest), never the user's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import TEST_CONFIG_DIR, USER_SETTINGS, USER_SETTINGS_BEFORE, _snapshot


def test_ultralytics_uses_the_suites_settings_folder() -> None:
    from ultralytics.utils import SETTINGS_FILE, USER_CONFIG_DIR

    assert Path(USER_CONFIG_DIR).parent == TEST_CONFIG_DIR and Path(SETTINGS_FILE).is_relative_to(TEST_CONFIG_DIR)
    assert Path(SETTINGS_FILE) != USER_SETTINGS
    code = "from ultralytics.utils import SETTINGS_FILE; print(SETTINGS_FILE)"  # what a subprocess of a test sees
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         check=True).stdout.strip().splitlines()[-1]
    assert Path(out).is_relative_to(TEST_CONFIG_DIR)


def test_user_settings_file_untouched_so_far() -> None:
    # the session-wide check (conftest.user_settings_untouched) runs again after the last test
    assert _snapshot(USER_SETTINGS) == USER_SETTINGS_BEFORE
