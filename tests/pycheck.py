"""What the Python test scripts share: a tally of named checks (printed as they pass or fail,
closing with the 'N passed, M failed' line) and running one of the built tools."""
import os
import subprocess
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

    def finish(self):
        """Lists the failed checks, prints the closing tally and returns the exit status."""
        if self.failed:
            print("failed checks:")
            for name in self.failed:
                print(f"  {name}")
        print(f"{self.passed} passed, {len(self.failed)} failed")
        return 1 if self.failed else 0


class RunFailure(Exception):
    pass


def require_jsonschema(script):
    """The jsonschema module with draft 2020-12 support; exits 77 (skipped) without it."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is None or not hasattr(jsonschema, "Draft202012Validator"):
        print(f"{script}: jsonschema with draft 2020-12 support is not available; skipping",
              file=sys.stderr)
        sys.exit(77)
    return jsonschema


def run_tool(bindir, tool, args, expect_rc=0, quiet=True):
    """Runs bindir/tool with args (and -q), raising RunFailure on an unexpected exit status."""
    cmd = [os.path.join(bindir, tool)] + [str(a) for a in args] + (["-q"] if quiet else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=240)
    if proc.returncode != expect_rc:
        raise RunFailure(f"`{' '.join(cmd)}` exited with {proc.returncode} (expected {expect_rc}):\n"
                         f"{proc.stderr.decode(errors='replace').strip()}")
    return proc
