"""dsa-score, dsa-select and dsa-attend as MPI ranks (docs/DESIGN.md section 8) against one
process: `mpirun -np N TOOL ...` must write the single process's output files byte for byte
(.npy and .jsonl, the attention's --lse too) and its report (every field but the run's own:
command, timings, threads, memory, and the ranks it adds), for prefill and decode rows, a batch,
compressed keys, a query block that is not the default, precomputed selections, the fp8 cache
and DeepSeek-V4's attention (csa over a selection of compressed entries or every visible one,
hca, swa; windows long enough that a chunk of rows is short and shares start inside the rows).
A bad input fails every rank with the single process's exit code and one message, an output
rank 0 cannot open or fill ends the job, stdin and a terminal stdout are refused, and none of
them leaves an output file. Usage: mpi_tools_check.py --bin DIR --mpirun MPIRUN"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

RUN_OWN = ("command", "timings_ms", "stage_ms", "threads", "peak_rss_bytes", "peak_device_bytes",
           "ranks")


def run(cmd, cwd=None, env=None):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, **(env or {})))


def read_safetensors(path):
    """{name: (dtype, shape, bytes)} of a .safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return {name: (t["dtype"], t["shape"], data[8 + n + t["data_offsets"][0]:8 + n +
                                                t["data_offsets"][1]])
            for name, t in header.items()}


def write_npy(path, shape, data):
    """An f32 .npy file (version 1.0) of the given shape and little-endian bytes."""
    dims = "".join(f"{d}, " for d in shape) if len(shape) == 1 else ", ".join(map(str, shape))
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + data)


def files_of(directory):
    """The output files a run left, by name (its report aside)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name != "report.json":
            with open(os.path.join(directory, name), "rb") as f:
                out[name] = f.read()
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--mpirun", required=True)
    parser.add_argument("--device", default="cpu",
                        help="the tools' --device (auto on a GPU machine: each rank its GPU)")
    args = parser.parse_args()
    tool = lambda name: os.path.join(args.bin, name)
    os.environ.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    mpirun = lambda n: [args.mpirun, "--oversubscribe", "-np", str(n)]
    failures = []
    with tempfile.TemporaryDirectory() as d:
        w, dec, c, h, m = (os.path.join(d, f"{n}.safetensors")
                           for n in ("w", "dec", "c", "h", "m"))
        for path, extra in ((w, ["--length", "700", "--seed", "3"]),
                            (dec, ["--length", "500", "--queries", "70", "--seed", "4"]),
                            (c, ["--length", "400", "--compress-ratio", "4", "--seed", "5"]),
                            (h, ["--length", "600", "--compress-ratio", "128", "--seed", "7"]),
                            (m, ["--length", "200", "--heads", "2", "--dqk", "576", "--dv",
                                 "512", "--seed", "6"])):
            r = run([tool("dsa-gen"), *extra, "-q", "-o", path])
            if r.returncode:
                sys.exit(f"dsa-gen failed: {r.stderr}")
        # A batch of two: two workloads' tensors stacked (batch elements 0 and 1).
        w2 = os.path.join(d, "w2.safetensors")
        r = run([tool("dsa-gen"), "--length", "700", "--seed", "9", "-q", "-o", w2])
        if r.returncode:
            sys.exit(f"dsa-gen failed: {r.stderr}")
        # And of two V4 workloads (compressed entries of ratio 4).
        c2 = os.path.join(d, "c2.safetensors")
        r = run([tool("dsa-gen"), "--length", "400", "--compress-ratio", "4", "--seed", "8", "-q",
                 "-o", c2])
        if r.returncode:
            sys.exit(f"dsa-gen failed: {r.stderr}")
        batch = {}
        for prefix, (one_file, two_file), names in (
                ("b", (w, w2), ("q", "kv", "q_index", "k_index", "weights")),
                ("cb", (c, c2), ("q", "kv", "compressed"))):
            first, second = read_safetensors(one_file), read_safetensors(two_file)
            for name in names:
                dtype, shape, data = first[name]
                assert dtype == "F32", dtype
                batch[f"{prefix}_{name}"] = os.path.join(d, f"{prefix}_{name}.npy")
                write_npy(batch[f"{prefix}_{name}"], [2, *shape], data + second[name][2])

        def one(name, flags):
            """Runs TOOL once (one process) into a fresh directory; returns its path."""
            out = os.path.join(d, "one")
            os.makedirs(out, exist_ok=True)
            r = run([tool(name), *flags, "--device", args.device, "--threads", "1", "--report",
                     "report.json"], cwd=out)
            if r.returncode:
                sys.exit(f"{name} {flags}: one process failed: {r.stderr}")
            return out

        sel, sel_jsonl, scores = (os.path.join(d, n) for n in ("sel.npy", "sel.jsonl",
                                                               "scores.npy"))
        sel_m, sel_b = os.path.join(d, "sel_m.npy"), os.path.join(d, "sel_b.npy")
        sel_c, sel_c_jsonl = os.path.join(d, "sel_c.npy"), os.path.join(d, "sel_c.jsonl")
        for flags, out in (
                (["--q-index", f"{w}:q_index", "--k-index", f"{w}:k_index", "--weights",
                  f"{w}:weights", "-k", "64", "-q", "-o", sel], None),
                (["--q-index", f"{w}:q_index", "--k-index", f"{w}:k_index", "--weights",
                  f"{w}:weights", "-k", "64", "-q", "-o", sel_jsonl], None),
                (["--q-index", f"{m}:q_index", "--k-index", f"{m}:k_index", "--weights",
                  f"{m}:weights", "-k", "32", "-q", "-o", sel_m], None),
                (["--q-index", batch["b_q_index"], "--k-index", batch["b_k_index"], "--weights",
                  batch["b_weights"], "-k", "48", "-q", "-o", sel_b], None),
                # Selections of V4's compressed entries (entry j visible once t >= 4 j + 3).
                (["--q-index", f"{c}:q_index", "--k-index", f"{c}:k_index", "--weights",
                  f"{c}:weights", "--compress-ratio", "4", "-k", "24", "-q", "-o", sel_c], None),
                (["--q-index", f"{c}:q_index", "--k-index", f"{c}:k_index", "--weights",
                  f"{c}:weights", "--compress-ratio", "4", "-k", "16", "-q", "-o", sel_c_jsonl],
                 None)):
            r = run([tool("dsa-select"), *flags])
            if r.returncode:
                sys.exit(f"dsa-select failed: {r.stderr}")
        r = run([tool("dsa-score"), "--q-index", f"{dec}:q_index", "--k-index",
                 f"{dec}:k_index", "--weights", f"{dec}:weights", "-q", "-o", scores])
        if r.returncode:
            sys.exit(f"dsa-score failed: {r.stderr}")

        indexer = lambda x: ["--q-index", f"{x}:q_index", "--k-index", f"{x}:k_index",
                             "--weights", f"{x}:weights"]
        v4 = lambda x: ["--attention", "csa", "--q", f"{x}:q", "--kv", f"{x}:kv"]
        batched_indexer = ["--q-index", batch["b_q_index"], "--k-index", batch["b_k_index"],
                           "--weights", batch["b_weights"]]
        cases = {
            ("dsa-score", "prefill, fp8, Hadamard, query block 5"): [
                *indexer(w), "--precision", "fp8", "--hadamard", "--query-block", "5", "-o",
                "s.npy"],
            ("dsa-score", "a batch of two"): [*batched_indexer, "-o", "s.npy"],
            ("dsa-score", "compressed keys"): [*indexer(c), "--compress-ratio", "4", "-o",
                                               "s.npy"],
            ("dsa-select", "fused, bf16, .npy"): [*indexer(w), "--precision", "bf16", "-k", "32",
                                                  "-o", "sel.npy"],
            ("dsa-select", "fused, decode, .jsonl"): [*indexer(dec), "-k", "40", "-o",
                                                      "sel.jsonl"],
            ("dsa-select", "fused, a batch of two, .jsonl"): [*batched_indexer, "-k", "16",
                                                              "-o", "sel.jsonl"],
            ("dsa-select", "fused, compressed keys"): [*indexer(c), "--compress-ratio", "4",
                                                       "-k", "24", "-o", "sel.npy"],
            ("dsa-select", "from scores, decode"): ["--scores", scores, "-k", "50", "-o",
                                                    "sel.npy"],
            ("dsa-attend", "sparse, --lse"): ["--q", f"{w}:q", "--kv", f"{w}:kv", "--dv", "48",
                                              "--indices", sel, "-o", "o.npy", "--lse",
                                              "lse.npy"],
            ("dsa-attend", "sparse over .jsonl indices"): [
                "--q", f"{w}:q", "--kv", f"{w}:kv", "--dv", "48", "--indices", sel_jsonl, "-o",
                "o.npy"],
            ("dsa-attend", "dense, --lse"): ["--q", f"{w}:q", "--kv", f"{w}:kv", "--dv", "48",
                                             "--dense", "-o", "o.npy", "--lse", "lse.npy"],
            ("dsa-attend", "dense, decode"): ["--q", f"{dec}:q", "--kv", f"{dec}:kv", "--dv",
                                              "48", "--dense", "-o", "o.npy"],
            ("dsa-attend", "sparse, a batch of two"): [
                "--q", batch["b_q"], "--kv", batch["b_kv"], "--dv", "48", "--indices", sel_b,
                "-o", "o.npy", "--lse", "lse.npy"],
            ("dsa-attend", "sparse, fp8 cache"): ["--q", f"{m}:q", "--kv", f"{m}:kv",
                                                  "--indices", sel_m, "--kv-cache", "fp8", "-o",
                                                  "o.npy"],
            # DeepSeek-V4: a window of 8192 (longer than the 400 tokens) makes a chunk of
            # compressed_attention 16 rows, which shares start at; 4096 makes it 48.
            ("dsa-attend", "--attention csa, .npy selection, --lse"): [
                *v4(c), "--compressed", f"{c}:compressed", "--sink", f"{c}:sink", "--window",
                "8192", "--indices", sel_c, "-o", "o.npy", "--lse", "lse.npy"],
            ("dsa-attend", "--attention csa, .jsonl selection"): [
                *v4(c), "--compressed", f"{c}:compressed", "--window", "4096", "--indices",
                sel_c_jsonl, "-o", "o.npy"],
            ("dsa-attend", "--attention csa, every visible entry, a batch of two"): [
                "--attention", "csa", "--q", batch["cb_q"], "--kv", batch["cb_kv"],
                "--compressed", batch["cb_compressed"], "--sink", f"{c}:sink", "--window",
                "8192", "--dense", "-o", "o.npy", "--lse", "lse.npy"],
            ("dsa-attend", "--attention hca, --lse"): [
                "--attention", "hca", "--q", f"{h}:q", "--kv", f"{h}:kv", "--compressed",
                f"{h}:compressed", "--sink", f"{h}:sink", "--window", "8192", "-o", "o.npy",
                "--lse", "lse.npy"],
            ("dsa-attend", "--attention swa"): [
                "--attention", "swa", "--q", f"{c}:q", "--kv", f"{c}:kv", "--sink",
                f"{c}:sink", "--window", "8192", "-o", "o.npy", "--lse", "lse.npy"],
            ("dsa-attend", "--attention swa, the default window"): [
                "--attention", "swa", "--q", f"{c}:q", "--kv", f"{c}:kv", "-o", "o.npy"],
        }
        for (name, case), flags in cases.items():
            single = one(name, flags)
            want_files = files_of(single)
            with open(os.path.join(single, "report.json")) as f:
                want = {k: v for k, v in json.load(f).items() if k not in RUN_OWN}
            for n in (2, 3):
                out = os.path.join(d, f"np{n}")
                os.makedirs(out)
                # 3 ranks keep at most 1000 bytes of a share in memory: the rest of it waits
                # in a temporary file (SharedOutput), which must give the same bytes.
                label = f"{name}, {case}, {n} ranks" + (", shares spilled" if n == 3 else "")
                r = run(mpirun(n) + [tool(name), *flags, "--device", args.device, "--threads", "1",
                                     "--report", "report.json"], cwd=out,
                        env={"DSA_RANK_MEMORY": "1000", "TMPDIR": d} if n == 3 else None)
                if r.returncode:
                    failures.append(f"{label}: exit {r.returncode}: {r.stderr}")
                    subprocess.run(["rm", "-r", out])
                    continue
                got_files = files_of(out)
                if got_files.keys() != want_files.keys():
                    failures.append(f"{label}: wrote {sorted(got_files)}, one process "
                                    f"{sorted(want_files)}")
                for file, data in want_files.items():
                    if got_files.get(file) != data:
                        failures.append(f"{label}: {file} differs from one process's")
                with open(os.path.join(out, "report.json")) as f:
                    full = json.load(f)
                got = {k: v for k, v in full.items() if k not in RUN_OWN}
                if got != want:
                    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
                    failures.append(f"{label}: report fields differ from one process: {diff}")
                ranks = full.get("ranks", [])
                rows = [e.get("rows") for e in ranks]
                total = 1
                for dim in want["outputs"][0]["shape"][:-1 if name != "dsa-attend" else -2]:
                    total *= dim
                tiles = (len(ranks) == n and rows[0][0] == 0 and rows[-1][1] == total and
                         all(rows[i][1] == rows[i + 1][0] for i in range(n - 1)) and
                         [e.get("rank") for e in ranks] == list(range(n)) and
                         all("timings_ms" in e and e.get("device") == want["device"]
                             for e in ranks))
                if not tiles:
                    failures.append(f"{label}: ranks {ranks} do not tile {total} rows")
                print(f"{label}: outputs and report equal to one process's, shares {rows}, "
                      f"on {want['device']}")
                subprocess.run(["rm", "-r", out])
            subprocess.run(["rm", "-r", single])

        # Failures: every rank exits with the single process's code, rank 0 prints one line,
        # and no output is left (stderr has mpirun's own lines besides).
        empty = os.path.join(d, "empty")
        os.makedirs(empty)

        def expect_failure(label, name, flags, code, text, launcher=()):
            r = run(mpirun(2) + [*launcher, tool(name), *flags], cwd=empty)
            lines = [l for l in r.stderr.splitlines() if l.startswith(f"{name}: error")]
            if (r.returncode != code or len(lines) != 1 or text not in lines[0] or
                    os.listdir(empty)):
                failures.append(f"{label}: exit {r.returncode} (want {code}), {len(lines)} "
                                f"error lines, left {os.listdir(empty)}: {r.stderr}")
            else:
                print(f"{label}: exit {code}, {lines[0]}")
            for name in os.listdir(empty):
                os.remove(os.path.join(empty, name))

        attend = ["--q", f"{w}:q", "--kv", f"{w}:kv", "--dv", "48"]
        expect_failure("dsa-attend, a selection of another shape", "dsa-attend",
                       [*attend, "--indices", sel_m, "-o", "o.npy", "--lse", "lse.npy"], 3,
                       "(indices): expected shape")
        expect_failure("dsa-score, k_index of another width", "dsa-score",
                       ["--q-index", f"{w}:q_index", "--k-index", f"{w}:kv", "--weights",
                        f"{w}:weights", "-o", "s.npy"], 3, "(k_index): expected shape")
        expect_failure("dsa-select, an integer score matrix", "dsa-select",
                       ["--scores", sel, "-k", "8", "-o", "sel.npy"], 3,
                       "(scores): expected a floating-point tensor")
        expect_failure("dsa-attend, --lse in a missing directory", "dsa-attend",
                       [*attend, "--dense", "-o", "o.npy", "--lse",
                        os.path.join(empty, "missing", "lse.npy")], 1, "rank 0 of 2")
        # A failure after the ranks agreed (rank 0's disk is full) aborts the job.
        expect_failure("dsa-attend, -o /dev/full", "dsa-attend",
                       [*attend, "--dense", "-o", "/dev/full"], 1, "No space left on device")
        # A share that cannot wait in the ranks' $TMPDIR (mpirun's own stays usable) ends the
        # job, leaving no output.
        expect_failure("dsa-attend, a share spilled where no file can be made", "dsa-attend",
                       [*attend, "--dense", "-o", "o.npy"], 1, "cannot keep this rank's share",
                       ["-x", "DSA_RANK_MEMORY=1000", "-x", "TMPDIR=/proc/nothing"])
        expect_failure("dsa-select, stdin", "dsa-select",
                       ["--scores", "-", "-k", "8", "-o", "sel.npy"], 2, "stdin ('-')")
        # stdout: Open MPI makes it a terminal for the ranks, which is refused; where a
        # launcher gives them a pipe instead, it carries the single process's bytes.
        r = subprocess.run(mpirun(2) + [tool("dsa-score"), *indexer(w), "-q", "-o", "-"],
                           capture_output=True, cwd=empty)
        alone = subprocess.run([tool("dsa-score"), *indexer(w), "-q", "-o", "-"],
                               capture_output=True).stdout
        refused = r.returncode == 2 and b"under mpirun stdout ('-') is a terminal" in r.stderr
        if not (refused or (r.returncode == 0 and r.stdout == alone)) or os.listdir(empty):
            failures.append(f"dsa-score -o - as 2 ranks: exit {r.returncode}: {r.stderr}")
        else:
            print(f"dsa-score -o - as 2 ranks: {'refused' if refused else 'the same bytes'}")
        expect_failure("dsa-attend --attention hca, entries of ratio 4", "dsa-attend",
                       ["--attention", "hca", "--q", f"{c}:q", "--kv", f"{c}:kv", "--compressed",
                        f"{c}:compressed", "-o", "o.npy", "--lse", "lse.npy"], 3,
                       "(compressed): expected shape [3, 64]")
        expect_failure("dsa-attend --attention csa, a selection of other rows", "dsa-attend",
                       [*v4(c), "--compressed", f"{c}:compressed", "--indices", sel_b, "-o",
                        "o.npy"], 3, "(indices): expected shape")
        expect_failure("dsa-gen", "dsa-gen", ["--length", "64", "-o", "g.safetensors"], 2,
                       "runs as one process, not as 2 MPI ranks")
    for f in failures:
        print("FAIL:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
