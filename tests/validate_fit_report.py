#!/usr/bin/env python3
"""Validates dsa-fit's training log against its schema (tests/schema/dsa-fit.schema.json).

Generates a small workload with hidden states (dsa-gen --hidden), runs a warm-up from a random
start and a sparse stage from its weights, validates both logs, checks a few counts against
the options, then checks that copies with a field removed, of the wrong type, or extra are
rejected, so that the schema check can fail.

Usage: python3 tests/validate_fit_report.py --bin DIR --schema FILE
Exit status: 0 all checks passed, 1 a check failed, 77 jsonschema is missing.
"""

import argparse
import copy
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pycheck import Checks, require_jsonschema, run_tool  # noqa: E402

jsonschema = require_jsonschema("validate_fit_report")
CHECKS = Checks()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--schema", required=True)
    args = parser.parse_args()
    with open(args.schema) as f:
        validator = jsonschema.Draft202012Validator(json.load(f))
    logs = {}
    with tempfile.TemporaryDirectory() as tmp:
        at = lambda name: os.path.join(tmp, name)  # noqa: E731
        run_tool(args.bin, "dsa-gen", ["--length", 120, "--needles", 2, "--needle-distance", 30,
                                       "--hidden", 200, "-o", at("g.safetensors")])
        g = at("g.safetensors")
        inputs = ["--hidden", g + ":hidden", "--q", g + ":q", "--kv", g + ":kv", "--dv", 48]
        run_tool(args.bin, "dsa-fit", inputs + [
            "--indexer-heads", 2, "--indexer-dim", 8, "--steps", 4, "--eval-every", 2,
            "--eval-topk", 16, "-o", at("w.safetensors"), "--log", at("warmup.json")])
        run_tool(args.bin, "dsa-fit", inputs + [
            "--init", at("w.safetensors"), "--stage", "sparse", "-k", 8, "--steps", 3,
            "--eval-topk", 200, "-o", at("s.safetensors"), "--log", at("sparse.json")])
        for name in ("warmup", "sparse"):
            with open(at(name + ".json")) as f:
                logs[name] = json.load(f)
        init = at("w.safetensors")
    for name, log in logs.items():
        errors = [e.message[:160] for e in validator.iter_errors(log)]
        CHECKS.record(f"{name}: schema", not errors, "; ".join(errors[:3]))
    warmup, sparse = logs["warmup"], logs["sparse"]
    CHECKS.record("warmup: one loss per step", len(warmup["loss"]) == 4)
    CHECKS.record("warmup: evaluations at steps 0, 2, 4",
                  [e["step"] for e in warmup["evaluations"]] == [0, 2, 4])
    CHECKS.record("warmup: held-out rows", warmup["rows"] == {"train": 90, "holdout": 30})
    CHECKS.record("sparse: topk and init",
                  sparse["config"]["topk"] == 8 and sparse["config"]["init"] == init)
    CHECKS.record("sparse: k above every held-out row gives null metrics",
                  all(e["rows"] == 0 and e["topk_recall_mean"] is None for e in sparse["evaluations"]))
    broken = {"field removed": lambda r: r.pop("loss"),
              "wrong type": lambda r: r["rows"].update(train="90"),
              "extra field": lambda r: r.update(extra=1),
              "wrong schema": lambda r: r.update(schema="dsa-fit/1"),
              "recall above 1": lambda r: r["evaluations"][0].update(topk_recall_mean=1.5)}
    for name, damage in broken.items():
        report = copy.deepcopy(warmup)
        damage(report)
        CHECKS.record(f"rejects {name}", not validator.is_valid(report))
    return CHECKS.finish()


if __name__ == "__main__":
    sys.exit(main())
