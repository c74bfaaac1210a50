"""Paths the tests read, from this file's place in the repository (``tests/helpers/``),
whatever the working directory."""
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
README = REPO / "README.md"
# The Frappe data lives in ../shared/data beside the repository (its terms forbid copying
# it here); the tests that read it skip when it is absent.
FRAPPE = REPO.parent / "shared" / "data" / "frappe" / "frappe.validation.libfm"
