"""What the Python test scripts share: a tally of named checks (printed as they pass or fail,
closing with the 'N passed, M failed' line) and the error a failed tool run raises."""
import sys


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = []
        self.worst = {}  # category -> (error, check name)

    def record(self, name, ok, detail="", category=None, error=None):
        if category is not None and error is not None:
            prev = self.worst.get(category)
            if prev is None or error > prev[0]:
                self.worst[category] = (error, name)
        if ok:
            self.passed += 1
            print(f"ok    {name}" + (f"  ({detail})" if detail else ""))
        else:
            self.failed.append(name)
            print(f"FAIL  {name}: {detail}")
        sys.stdout.flush()
        return ok


class RunFailure(Exception):
    pass
