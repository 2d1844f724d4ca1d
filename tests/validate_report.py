#!/usr/bin/env python3
"""Validates the JSON report of dsa-compare against its schema (tests/schema/dsa-compare.schema.json).

Runs dsa-compare in four modes and validates each report:

  * indexer: data/workload.safetensors (MQA layout) with --sweep-topk 16,64, report on stdout
    (a pipe, so it must be one line);
  * indices: a selection written by `dsa-select -k 32` into a temporary directory, read back
    with --indices, report written with -o FILE (indented);
  * mha: small random .npy inputs written here with numpy, MHA/GQA layout (--k, --v), batched,
    decode-like (Lq < Lk), with the indexer and --needles;
  * v4: DeepSeek-V4's CSA (--attention csa) on random .npy inputs, the indexer over compressed
    keys, a window and a sink.

Besides the schema, a few counts of each report are checked against the inputs (rows, summary
counts, bucket rows, needles, FLOPs). Then negative checks: copies of the reports with a field
removed, a field of the wrong type, an extra field, a wrong schema name or fields of the other
selection mode must be rejected, so that the schema check can fail.

Usage: python3 tests/validate_report.py --bin DIR --schema FILE --data REPO_DIR [--keep]
Exit status: 0 all checks passed, 1 a check failed, 77 numpy or jsonschema is missing.
The last line is "N passed, M failed".
"""

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pycheck import Checks, RunFailure, require_jsonschema  # noqa: E402

try:
    import numpy as np
except ImportError as e:
    print(f"validate_report: {e.name} is not available; skipping", file=sys.stderr)
    sys.exit(77)
jsonschema = require_jsonschema("validate_report")


CHECKS = Checks()


def run(cmd, stdin=None):
    proc = subprocess.run([str(c) for c in cmd], stdin=stdin, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=240)
    if proc.returncode != 0:
        raise RunFailure(f"{' '.join(str(c) for c in cmd)}: exit {proc.returncode}: "
                         f"{proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def schema_errors(validator, report):
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message[:160]}"
            for e in errors]


def check_valid(validator, name, report):
    errors = schema_errors(validator, report)
    return CHECKS.record(f"{name}: schema", not errors,
                         "; ".join(errors[:5]) + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""))


# ------------------------------------------------------------------------------------------
# Counts that follow from the inputs (man/dsa-compare.1, METRICS and REPORT)

PER_HEAD = ("out_rel_err", "out_cosine", "mass_recall_head")
PER_ROW = ("mass_recall", "topk_recall", "kl_dense", "kl_sparse")


def check_counts(name, report, ks, batch, queries, keys, heads, needles=0, indexer=None):
    problems = []
    shape = report.get("shape", {})
    expect_shape = {"batch": batch, "queries": queries, "keys": keys, "heads": heads}
    for key, value in expect_shape.items():
        if shape.get(key) != value:
            problems.append(f"shape.{key} = {shape.get(key)}, expected {value}")
    positions = [keys - queries + r for r in range(queries)]
    got_ks = [entry.get("topk") for entry in report.get("results", [])]
    if got_ks != ks:
        problems.append(f"results k = {got_ks}, expected {ks}")
    visible = batch * sum(t + 1 for t in positions)
    d_qk, d_v = shape.get("d_qk", 0), shape.get("d_v", 0)
    dense = 2.0 * visible * heads * (d_qk + d_v)
    if abs(report["flops"]["dense_attention"] - dense) > 1e-9 * dense:
        problems.append(f"flops.dense_attention = {report['flops']['dense_attention']}, expected {dense}")
    if indexer is not None:
        want = 2.0 * visible * indexer[0] * indexer[1]
        if abs(report["flops"]["indexer"] - want) > 1e-9 * want:
            problems.append(f"flops.indexer = {report['flops']['indexer']}, expected {want}")
    for entry in report.get("results", []):
        k = entry["topk"]
        exact = batch * sum(1 for t in positions if t + 1 <= k)
        sparse = batch * queries - exact
        if entry["rows"] != {"sparse": sparse, "exact": exact}:
            problems.append(f"k={k}: rows = {entry['rows']}, expected sparse {sparse}, exact {exact}")
        for metric in PER_HEAD + PER_ROW:
            split = entry[metric]
            if split is None:
                continue
            per = heads if metric in PER_HEAD else 1
            for kind, rows in (("sparse", sparse), ("exact", exact)):
                s = split[kind]
                if s["count"] + s["undefined"] != rows * per:
                    problems.append(f"k={k}: {metric}.{kind} count {s['count']} + undefined "
                                    f"{s['undefined']} != {rows * per}")
        bucket_rows = sum(b["rows"] for b in entry["buckets"])
        if bucket_rows != batch * queries:
            problems.append(f"k={k}: bucket rows add up to {bucket_rows}, not {batch * queries}")
        begins = [b["begin"] for b in entry["buckets"]]
        if begins != sorted(begins):
            problems.append(f"k={k}: buckets not in ascending order")
        for b in entry["buckets"]:
            if b["begin"] != 0 and b["begin"] % k != 0 or b["end"] <= b["begin"]:
                problems.append(f"k={k}: bucket [{b['begin']}, {b['end']}) is not a k-multiple range")
        if entry["needle_recall"]["needles"] != needles * batch:
            problems.append(f"k={k}: needle_recall.needles = {entry['needle_recall']['needles']}, "
                            f"expected {needles * batch}")
    CHECKS.record(f"{name}: counts", not problems, "; ".join(problems[:5]))


# ------------------------------------------------------------------------------------------
# Negative checks: mutated copies must be rejected


def mutate(report, path, action, value=None):
    """Returns a copy of report with the field at path (keys and list indices) removed
    (action "remove") or set to value ("set")."""
    out = copy.deepcopy(report)
    node = out
    for key in path[:-1]:
        node = node[key]
    if action == "remove":
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def check_rejected(validator, name, report):
    errors = schema_errors(validator, report)
    return CHECKS.record(f"negative: {name}", bool(errors),
                         errors[0] if errors else "the schema accepted it")


# ------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", required=True, help="directory holding dsa-compare and dsa-select")
    parser.add_argument("--schema", required=True, help="tests/schema/dsa-compare.schema.json")
    parser.add_argument("--data", required=True,
                        help="the repository (holding data/workload.safetensors) or its data/ directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    compare = os.path.join(args.bin, "dsa-compare")
    select = os.path.join(args.bin, "dsa-select")
    sample = os.path.join(args.data, "data", "workload.safetensors")
    if not os.path.exists(sample):
        sample = os.path.join(args.data, "workload.safetensors")
    for path in (compare, select, sample, args.schema):
        if not os.path.exists(path):
            CHECKS.record(f"{path} exists", False, "missing")
            return CHECKS.finish()

    with open(args.schema) as f:
        schema = json.load(f)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
        CHECKS.record("schema is a valid draft 2020-12 schema", True)
    except jsonschema.SchemaError as e:
        CHECKS.record("schema is a valid draft 2020-12 schema", False, e.message)
        print(f"{CHECKS.passed} passed, {len(CHECKS.failed)} failed")
        return 1
    CHECKS.record("schema pins dsa-compare/3",
                  schema.get("properties", {}).get("schema", {}).get("const") == "dsa-compare/3")
    validator = jsonschema.Draft202012Validator(schema)

    d = sample
    indexer_args = ["--q-index", f"{d}:q_index", "--k-index", f"{d}:k_index", "--weights", f"{d}:weights"]
    tmp = tempfile.mkdtemp(prefix="dsa-report-")
    reports = {}
    try:
        # 1. Indexer mode, sweep, report on stdout (a pipe: one line).
        try:
            out = run([compare, "--q", f"{d}:q", "--kv", f"{d}:kv", "--dv", 48] + indexer_args
                      + ["--sweep-topk", "16,64"])
            text = out.decode()
            CHECKS.record("indexer: one line on a pipe", text.count("\n") == 1 and text.endswith("\n"),
                          f"{text.count(chr(10))} newlines")
            report = json.loads(text)
            reports["indexer"] = report
            if check_valid(validator, "indexer", report):
                check_counts("indexer", report, [16, 64], 1, 2048, 2048, report["shape"]["heads"],
                             indexer=(report["shape"]["indexer_heads"], report["shape"]["indexer_dim"]))
                CHECKS.record("indexer: selection and KL losses",
                              report["selection"] == "indexer"
                              and all(isinstance(e["kl_sparse"], dict) for e in report["results"]))
        except (RunFailure, json.JSONDecodeError, KeyError, TypeError) as e:
            CHECKS.record("indexer: run", False, str(e))

        # 2. --indices from dsa-select -k 32, report to a file (indented).
        try:
            idx = os.path.join(tmp, "idx.npy")
            run([select] + indexer_args + ["-k", 32, "-o", idx, "-q"])
            path = os.path.join(tmp, "indices.json")
            run([compare, "--q", f"{d}:q", "--kv", f"{d}:kv", "--dv", 48, "--indices", idx, "-o", path])
            with open(path) as f:
                text = f.read()
            CHECKS.record("indices: indented in a file", text.count("\n") > 10, f"{text.count(chr(10))} lines")
            report = json.loads(text)
            reports["indices"] = report
            if check_valid(validator, "indices", report):
                check_counts("indices", report, [32], 1, 2048, 2048, report["shape"]["heads"], indexer=(0, 0))
                CHECKS.record("indices: no indexer, no KL losses",
                              report["selection"] == "indices" and "indexer" not in report
                              and report["results"][0]["kl_dense"] is None
                              and report["inputs"][-1]["shape"] == [2048, 32])
        except (RunFailure, json.JSONDecodeError, KeyError, TypeError, OSError) as e:
            CHECKS.record("indices: run", False, str(e))

        # 3. MHA/GQA layout on random .npy inputs: batched, Lq < Lk, with needles.
        try:
            rng = np.random.default_rng(20251123)
            B, Lq, Lk, H, Hkv, dqk, dv, HI, dI = 2, 24, 40, 4, 2, 16, 8, 2, 8
            files = {
                "q": rng.standard_normal((B, Lq, H, dqk)),
                "k": rng.standard_normal((B, Lk, Hkv, dqk)),
                "v": rng.standard_normal((B, Lk, Hkv, dv)),
                "q_index": rng.standard_normal((B, Lq, HI, dI)),
                "k_index": rng.standard_normal((B, Lk, dI)),
                "weights": rng.random((B, Lq, HI)),
            }
            for name, array in files.items():
                np.save(os.path.join(tmp, f"{name}.npy"), array.astype(np.float32))
            needles = np.array([[30, 2], [39, 39], [16, 0]], dtype=np.int32)
            np.save(os.path.join(tmp, "needles.npy"), needles)
            p = lambda name: os.path.join(tmp, f"{name}.npy")  # noqa: E731
            out = run([compare, "--q", p("q"), "--k", p("k"), "--v", p("v"),
                       "--q-index", p("q_index"), "--k-index", p("k_index"), "--weights", p("weights"),
                       "--sweep-topk", "4,8,32", "--needles", p("needles"), "--threads", 2])
            report = json.loads(out)
            reports["mha"] = report
            if check_valid(validator, "mha", report):
                check_counts("mha", report, [4, 8, 32], B, Lq, Lk, H, needles=len(needles),
                             indexer=(HI, dI))
                CHECKS.record("mha: layout and heads",
                              report["layout"] == "mha" and report["shape"]["kv_heads"] == Hkv
                              and report["shape"]["d_v"] == dv and report["threads"] == 2)
        except (RunFailure, json.JSONDecodeError, KeyError, TypeError) as e:
            CHECKS.record("mha: run", False, str(e))
        # 4. DeepSeek-V4's CSA (--attention): the indexer over compressed keys, window and sink.
        try:
            rng = np.random.default_rng(20261201)
            T, Lq, H, d, HI, dI, W = 200, 16, 2, 32, 2, 8, 16
            files = {
                "v4q": rng.standard_normal((Lq, H, d)) * 0.3,
                "v4kv": rng.standard_normal((T, d)),
                "v4c": rng.standard_normal((T // 4, d)),
                "v4sink": rng.standard_normal((H,)),
                "v4qi": rng.standard_normal((Lq, HI, dI)),
                "v4ki": rng.standard_normal((T // 4, dI)),
                "v4w": rng.standard_normal((Lq, HI)),
            }
            for name, array in files.items():
                np.save(os.path.join(tmp, f"{name}.npy"), array.astype(np.float32))
            p = lambda name: os.path.join(tmp, f"{name}.npy")  # noqa: E731
            out = run([compare, "--attention", "csa", "--q", p("v4q"), "--kv", p("v4kv"),
                       "--compressed", p("v4c"), "--sink", p("v4sink"), "--window", W,
                       "--q-index", p("v4qi"), "--k-index", p("v4ki"), "--weights", p("v4w"),
                       "--sweep-topk", "4,8"])
            report = json.loads(out)
            reports["v4"] = report
            if check_valid(validator, "v4", report):
                positions = [T - Lq + r for r in range(Lq)]
                exact = [sum(1 for t in positions if (t + 1) // 4 <= k) for k in (4, 8)]
                rows = [entry["rows"] for entry in report["results"]]
                CHECKS.record("v4: layout, shape and exact rows",
                              report["layout"] == "v4" and report["attention"] == "csa"
                              and report["reference"] == "every-entry"
                              and report["shape"]["entries"] == T // 4
                              and report["shape"]["tokens"] == T
                              and rows == [{"sparse": Lq - e, "exact": e} for e in exact],
                              str(rows))
        except (RunFailure, json.JSONDecodeError, KeyError, TypeError) as e:
            CHECKS.record("v4: run", False, str(e))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    # Negative checks, on copies of the reports that validated.
    base = reports.get("indexer")
    if base is not None and not schema_errors(validator, base):
        s0 = ["results", 0]
        cases = [
            ("top-level schema removed", mutate(base, ["schema"], "remove")),
            ("results[0].out_cosine removed", mutate(base, s0 + ["out_cosine"], "remove")),
            ("a summary's p99 removed", mutate(base, s0 + ["mass_recall", "sparse", "p99"], "remove")),
            ("a bucket's rows removed", mutate(base, s0 + ["buckets", 0, "rows"], "remove")),
            ("timings_ms.total removed", mutate(base, ["timings_ms", "total"], "remove")),
            ("indexer removed in indexer mode", mutate(base, ["indexer"], "remove")),
            ("threads as a string", mutate(base, ["threads"], "set", "2")),
            ("rows.sparse not an integer", mutate(base, s0 + ["rows", "sparse"], "set", 1.5)),
            ("a bucket mean as a string", mutate(base, s0 + ["buckets", 0, "mass_recall"], "set", "high")),
            ("command as a string", mutate(base, ["command"], "set", "dsa-compare --q q.npy")),
            ("out_rel_err_global.all as a string", mutate(base, s0 + ["out_rel_err_global", "all"], "set", "0.1")),
            ("kl_sparse null in indexer mode", mutate(base, s0 + ["kl_sparse"], "set", None)),
            ("schema dsa-compare/1", mutate(base, ["schema"], "set", "dsa-compare/1")),
            ("an extra top-level field", mutate(base, ["outputs"], "set", [])),
            ("an extra summary field", mutate(base, s0 + ["topk_recall", "exact", "p95"], "set", 1.0)),
            ("topk_recall above 1", mutate(base, s0 + ["topk_recall", "sparse", "max"], "set", 1.5)),
            ("an unknown dtype", mutate(base, ["inputs", 0, "dtype"], "set", "float32")),
        ]
        empty = copy.deepcopy(base["results"][0]["out_cosine"]["sparse"])
        empty.update(count=0)
        cases.append(("a mean without values", mutate(base, s0 + ["out_cosine", "sparse"], "set", empty)))
        for name, report in cases:
            check_rejected(validator, name, report)
    else:
        CHECKS.record("negative checks", False, "no valid indexer report to mutate")
    indices = reports.get("indices")
    if indices is not None and base is not None and not schema_errors(validator, indices):
        s0 = ["results", 0]
        check_rejected(validator, "KL summaries with --indices",
                       mutate(indices, s0 + ["kl_dense"], "set", base["results"][0]["kl_dense"]))
        check_rejected(validator, "indexer configuration with --indices",
                       mutate(indices, ["indexer"], "set", base["indexer"]))
        check_rejected(validator, "indexer FLOPs with --indices",
                       mutate(indices, ["flops", "indexer"], "set", 1.0))
        check_rejected(validator, "two results with --indices",
                       mutate(indices, ["results"], "set", indices["results"] * 2))
    mha = reports.get("mha")
    if mha is not None and not schema_errors(validator, mha):
        check_rejected(validator, "mqa layout with two kv heads", mutate(mha, ["layout"], "set", "mqa"))

    return CHECKS.finish()


if __name__ == "__main__":
    sys.exit(main())
