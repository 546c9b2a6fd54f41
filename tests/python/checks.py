"""Check counting shared by the client scripts of tests/python/.

Each script counts its passed checks and stops at the first failed one; its
last line is `N passed, M failed`.
"""


class CheckFailed(Exception):
    """A check of the contract did not hold."""


class Checks:
    """Counts passed checks; the first failed one raises CheckFailed."""

    def __init__(self):
        self.passed = 0

    def check(self, condition, what, detail=""):
        if not condition:
            raise CheckFailed(what + (f": {detail}" if detail else ""))
        self.passed += 1
        print(f"ok {self.passed} - {what}", flush=True)

    def eq(self, actual, expected, what):
        self.check(actual == expected, what, f"expected {expected!r}, got {actual!r}")
