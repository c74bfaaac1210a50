"""Helpers the test folders share (plain functions and constants; the fixtures and
hooks stay in ``tests/conftest.py``). ``tests/`` is on ``sys.path`` (``pythonpath`` in
pyproject.toml's ``[tool.pytest.ini_options]``), so tests import them as
``from helpers.problems import make_problem``.

- ``helpers.paths``: the repository's files the tests read (README, the Frappe data
  beside the repository).
- ``helpers.backends``: the kernel backends that import here, and the compiled
  extensions.
- ``helpers.problems``: random FM and AFM kernel problems and step configurations.
- ``helpers.contract``: the checks that the FM and AFM kernel contract tests share.
"""
