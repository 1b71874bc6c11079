"""Puts tests/ on ``sys.path`` so that tests in any subfolder can ``from support.<module> import ...`` (tests/support/).

pytest's default import mode already prepends this folder when it loads this file; saying it here keeps that
true under ``--import-mode=importlib`` too.
"""

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
