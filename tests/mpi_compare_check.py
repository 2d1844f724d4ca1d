"""dsa-compare as MPI ranks (docs/DESIGN.md section 8) against one process: `mpirun -np N
dsa-compare ...` must write the single process's report bit for bit (every field but the run's
own: command, timings, threads, memory, and the ranks it adds), for the indexer with needles and
several k, and for a precomputed selection with the fp8 cache (batches: test_metrics' shares); a bad input fails every rank with
the single process's exit code, a failure on rank 0 alone ends the job, and neither leaves a
report. Usage: mpi_compare_check.py --bin DIR --mpirun MPIRUN [--schema SCHEMA]"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

RUN_OWN = ("command", "timings_ms", "stage_ms", "threads", "peak_rss_bytes", "peak_device_bytes",
           "ranks")


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def report(path):
    with open(path) as f:
        r = json.load(f)
    return {k: v for k, v in r.items() if k not in RUN_OWN}, r


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--mpirun", required=True)
    parser.add_argument("--schema", help="also validate the ranks' reports against it")
    args = parser.parse_args()
    schema = None
    if args.schema:
        import jsonschema
        with open(args.schema) as f:
            schema = json.load(f)
    tool = lambda name: os.path.join(args.bin, name)
    env_ok = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    os.environ.update(env_ok)
    mpirun = lambda n: [args.mpirun, "--oversubscribe", "-np", str(n)]
    failures = []
    with tempfile.TemporaryDirectory() as d:
        w = os.path.join(d, "w.safetensors")
        b = os.path.join(d, "b.safetensors")
        for path, extra in ((w, ["--length", "700", "--needles", "8"]),
                            (b, ["--length", "300", "--heads", "2", "--dqk", "576", "--dv", "512",
                                 "--needles", "2"])):
            r = run([tool("dsa-gen"), *extra, "--seed", "3", "-q", "-o", path])
            if r.returncode:
                sys.exit(f"dsa-gen failed: {r.stderr}")
        sel = os.path.join(d, "sel.npy")
        r = run([tool("dsa-select"), "--q-index", f"{b}:q_index", "--k-index", f"{b}:k_index",
                 "--weights", f"{b}:weights", "-k", "32", "-q", "-o", sel])
        if r.returncode:
            sys.exit(f"dsa-select failed: {r.stderr}")
        sel_w = os.path.join(d, "sel_w.npy")
        r = run([tool("dsa-select"), "--q-index", f"{w}:q_index", "--k-index", f"{w}:k_index",
                 "--weights", f"{w}:weights", "-k", "64", "-q", "-o", sel_w])
        if r.returncode:
            sys.exit(f"dsa-select failed: {r.stderr}")
        cases = {
            "indexer, needles, sweep": [
                "--q", f"{w}:q", "--kv", f"{w}:kv", "--dv", "48", "--q-index", f"{w}:q_index",
                "--k-index", f"{w}:k_index", "--weights", f"{w}:weights", "--needles",
                f"{w}:needles", "--sweep-topk", "16,64,256"],
            "indices, fp8 cache": [
                "--q", f"{b}:q", "--kv", f"{b}:kv", "--indices", sel, "--kv-cache", "fp8"],
            # Each rank asks for its host's next GPU; where there is none (CI), the CPU computes.
            "indices, --device auto": [
                "--q", f"{w}:q", "--kv", f"{w}:kv", "--dv", "48", "--indices", sel_w,
                "--device", "auto"],
        }
        for name, flags in cases.items():
            one = os.path.join(d, "one.json")
            r = run([tool("dsa-compare"), *flags, "--threads", "1", "-o", one])
            if r.returncode:
                sys.exit(f"{name}: one process failed: {r.stderr}")
            want, _ = report(one)
            for n in (2, 3):
                out = os.path.join(d, f"np{n}.json")
                r = run(mpirun(n) + [tool("dsa-compare"), *flags, "--threads", "1", "-o", out])
                if r.returncode:
                    failures.append(f"{name}, {n} ranks: exit {r.returncode}: {r.stderr}")
                    continue
                got, full = report(out)
                if schema is not None:
                    jsonschema.validate(full, schema)
                if got != want:
                    diff = [k for k in want if want[k] != got.get(k)]
                    failures.append(f"{name}, {n} ranks: fields differ from one process: {diff}")
                ranks = full.get("ranks", [])
                rows = [r["rows"] for r in ranks]
                total = want["shape"]["batch"] * want["shape"]["queries"]
                if len(ranks) != n or rows[0][0] != 0 or rows[-1][1] != total or any(
                        rows[i][1] != rows[i + 1][0] for i in range(n - 1)):
                    failures.append(f"{name}, {n} ranks: shares {rows} do not tile {total} rows")
                print(f"{name}, {n} ranks: report equal to one process's, shares {rows}")
        # A bad input: every rank fails as one process does (exit 3), no report.
        out = os.path.join(d, "bad.json")
        bad = ["--q", f"{w}:q", "--kv", f"{w}:q_index", "--q-index", f"{w}:q_index", "--k-index",
               f"{w}:k_index", "--weights", f"{w}:weights"]
        r = run(mpirun(2) + [tool("dsa-compare"), *bad, "-o", out])
        lines = [l for l in r.stderr.splitlines() if l.startswith("dsa-compare: error")]
        if r.returncode != 3 or os.path.exists(out) or len(lines) != 1:
            failures.append(f"bad input: exit {r.returncode}, {len(lines)} error lines, report "
                            f"{'left' if os.path.exists(out) else 'absent'}: {r.stderr}")
        # Rank 0 alone cannot write its report: the job ends, nothing is written.
        r = run(mpirun(2) + [tool("dsa-compare"), *cases["indexer, needles, sweep"], "-o",
                             os.path.join(d, "missing", "r.json")])
        if r.returncode == 0 or "rank 0 of 2" not in r.stderr:
            failures.append(f"unwritable report: exit {r.returncode}: {r.stderr}")
        # The tools that do not share rows refuse to run as several ranks.
        r = run(mpirun(2) + [tool("dsa-gen"), "--length", "64", "-o",
                             os.path.join(d, "g.safetensors")])
        if r.returncode != 2 or os.path.exists(os.path.join(d, "g.safetensors")):
            failures.append(f"dsa-gen as 2 ranks: exit {r.returncode}: {r.stderr}")
    for f in failures:
        print("FAIL:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
