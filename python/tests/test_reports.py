"""compare() and cost() return the reports the tools write, as dicts (checked against the
schema and against NumPy computations of their metrics); errors raise the classes of their exit
codes; the GIL is released while the library computes."""
import json
import os
import tempfile
import threading
import time
import unittest

import numpy as np

import refs
from refs import F32, F64, import_dsa, indexer_inputs, rng

dsa = import_dsa()

SOURCE_DIR = os.environ.get("DSA_SOURCE_DIR",
                            os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def compare_schema_validator():
    try:
        import jsonschema
    except ImportError:
        return None
    if not hasattr(jsonschema, "Draft202012Validator"):
        return None
    with open(os.path.join(SOURCE_DIR, "tests", "schema", "dsa-compare.schema.json")) as f:
        return jsonschema.Draft202012Validator(json.load(f))


def dense_probabilities(q, kv, scale):
    """P[t, h, s] of causal MQA attention (keys: all of kv's columns), float64."""
    Lq, Lk = q.shape[0], kv.shape[0]
    logits = scale * np.einsum("thd,sd->ths", q.astype(F64), kv.astype(F64))
    for t in range(Lq):
        logits[t, :, Lk - Lq + t + 1:] = -np.inf
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)


class Compare(unittest.TestCase):
    def setUp(self):
        self.seed = int.from_bytes(os.urandom(4), "little")
        g = rng(self.seed)
        self.L, self.H, self.d_qk, self.d_v = 40, 4, 24, 16
        self.q = g.standard_normal((self.L, self.H, self.d_qk)).astype(F32)
        self.kv = g.standard_normal((self.L, self.d_qk)).astype(F32)
        self.qi, self.ki, self.w = indexer_inputs(g, self.L, self.L, H=4, d=16)

    def check_schema(self, report):
        validator = compare_schema_validator()
        if validator is None:
            return
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(report)]
        self.assertEqual(errors, [], "schema dsa-compare/2")

    def test_indexer_report_against_numpy(self):
        report = dsa.compare(self.q, self.kv, self.qi, self.ki, self.w, d_v=self.d_v, topk=[8, 16])
        self.check_schema(report)
        self.assertEqual((report["tool"], report["selection"]), ("dsa-compare", "indexer"))
        self.assertTrue(report["schema"].startswith("dsa-compare/"))
        self.assertEqual(report["shape"]["indexer_heads"], 4)
        self.assertEqual([r["topk"] for r in report["results"]], [8, 16])
        scale = self.d_qk ** -0.5
        self.assertAlmostEqual(report["scale"], scale, places=6)
        P = dense_probabilities(self.q, self.kv, scale)
        p = P.mean(1)
        keys, values = refs.mqa_heads(self.kv, self.H, self.d_v)
        dense_out, _ = refs.attention(self.q, keys, values, lambda t: range(t + 1), scale)
        for result in report["results"]:
            k = result["topk"]
            sel = dsa.select(self.qi, self.ki, self.w, topk=k)[0]
            rows = [t for t in range(self.L) if t + 1 > k]
            self.assertEqual(result["rows"], {"sparse": len(rows), "exact": self.L - len(rows)})
            mass = [p[t, sel[t][sel[t] >= 0]].sum() for t in rows]
            self.assertAlmostEqual(result["mass_recall"]["sparse"]["mean"], np.mean(mass), places=5,
                                   msg=f"k={k} (seed {self.seed})")
            self.assertAlmostEqual(result["mass_recall"]["sparse"]["min"], np.min(mass), places=5)
            head_mass = [P[t, h, sel[t][sel[t] >= 0]].sum() for t in rows for h in range(self.H)]
            self.assertAlmostEqual(result["mass_recall_head"]["sparse"]["p50"],
                                   np.percentile(head_mass, 50), places=5)
            causal = np.arange(self.L)[None, :] <= np.arange(self.L)[:, None]
            oracle = refs.topk_rows(np.where(causal, p, -np.inf), k)[0]
            recall = [len(set(sel[t]) & set(oracle[t])) / min(k, t + 1) for t in rows]
            self.assertAlmostEqual(result["topk_recall"]["sparse"]["mean"], np.mean(recall), places=6)
            sparse_out, _ = refs.attention(self.q, keys, values, lambda t: sel[t][sel[t] >= 0], scale)
            diff = sum(np.sum((sparse_out[t] - dense_out[t]) ** 2) for t in rows)
            norm = sum(np.sum(dense_out[t] ** 2) for t in rows)
            self.assertAlmostEqual(result["out_rel_err_global"]["sparse"], np.sqrt(diff / norm),
                                   places=5)
            self.assertAlmostEqual(result["mass_recall"]["exact"]["min"], 1.0, places=6)
            # the same selection given as indices measures the same
            given = dsa.compare(self.q, self.kv, indices=sel, d_v=self.d_v)
            self.check_schema(given)
            self.assertEqual(given["selection"], "indices")
            self.assertAlmostEqual(given["results"][0]["mass_recall"]["sparse"]["mean"],
                                   result["mass_recall"]["sparse"]["mean"], places=6)
            self.assertIsNone(given["results"][0]["kl_dense"])

    def test_mha_needles_and_v4(self):
        g = rng(self.seed + 1)
        B, L, H, H_kv = 2, 24, 4, 2
        q = g.standard_normal((B, L, H, 8)).astype(F32)
        k = g.standard_normal((B, L, H_kv, 8)).astype(F32)
        v = g.standard_normal((B, L, H_kv, 6)).astype(F32)
        qi, ki, w = indexer_inputs(g, L, L, H=2, d=8, batch=B)
        needles = np.array([[10, 3], [20, 19]], dtype=np.int64)
        report = dsa.compare(q, None, qi, ki, w, k=k, v=v, topk=4, needles=needles,
                             precision="fp8", hadamard=True)
        self.check_schema(report)
        self.assertEqual((report["layout"], report["shape"]["kv_heads"]), ("mha", 2))
        self.assertEqual(report["results"][0]["needle_recall"]["needles"], 2 * B)
        self.assertEqual(report["indexer"]["precision"], "fp8")
        T, Lq, d = 64, 8, 16
        q4 = g.standard_normal((Lq, 2, d)).astype(F32)
        kv4 = g.standard_normal((T, d)).astype(F32)
        entries = g.standard_normal((T // 4, d)).astype(F32)
        qi4, _, w4 = indexer_inputs(g, Lq, 1, H=2, d=8)
        ki4 = g.standard_normal((T // 4, 8)).astype(F32)
        report = dsa.compare(q4, kv4, qi4, ki4, w4, attention="csa", compressed=entries,
                             sink=np.zeros(2, F32), window=16, topk=[2, 4])
        self.check_schema(report)
        self.assertEqual((report["layout"], report["attention"], report["reference"]),
                         ("v4", "csa", "every-entry"))
        kv128 = g.standard_normal((256, d)).astype(F32)  # HCA: an entry per 128 tokens
        report = dsa.compare(q4, kv128, attention="hca", compressed=kv128[:2], reference="dense")
        self.check_schema(report)
        self.assertEqual(report["selection"], "every-entry")


class Cost(unittest.TestCase):
    def test_report(self):
        report = dsa.cost(max_context=8192, step=4096)
        self.assertEqual((report["tool"], report["schema"]), ("dsa-cost", "dsa-cost/3"))
        self.assertTrue(os.path.isfile(os.path.join(report["presets"], "hardware.json")))
        self.assertEqual([p["position"] for p in report["points"]], [0, 4096, 8192])
        dense = report["models"]["dense"]
        x = 4096
        attention = [s for s in report["points"][1]["decode"]["dense"]["stages"]
                     if s["stage"] == "attention"][0]
        # DESIGN.md section 3: dense decode reads the latent cache in MQA mode
        self.assertEqual(attention["flops"],
                         dense["layers"] * 2 * dense["heads"] * (dense["d_qk"] + dense["d_v"]) * x)

    def test_overrides_formats_and_comparison(self):
        report = dsa.cost(max_context=4096, set={"dsa.topk": 1024, "hardware.price_per_gpu_hour": 3})
        self.assertEqual(report["models"]["dsa"]["topk"], 1024)
        self.assertEqual(report["hardware"]["price_per_gpu_hour"], 3)
        self.assertEqual(dsa.cost(max_context=4096, set=["dsa.topk=1024"])["models"], report["models"])
        csv = dsa.cost(max_context=8192, format="csv")
        self.assertTrue(csv.startswith("position,"))
        self.assertEqual(len(csv.strip().splitlines()), 1 + 3)
        with tempfile.TemporaryDirectory() as tmp:
            plot = os.path.join(tmp, "cost.svg")
            compared = dsa.cost(compare_models=["DeepSeek-V3.2", "DeepSeek-V4-Flash"],
                                max_context=1 << 20, step=1 << 19, plot=plot)
            with open(plot) as f:
                self.assertIn("<svg", f.read())
        self.assertEqual([m["name"] for m in compared["comparison"]["models"]],
                         ["DeepSeek-V3.2", "DeepSeek-V4-Flash"])

    def test_measured_layers(self):
        small = {"DeepSeek-V3.2-Exp.heads": 4, "DeepSeek-V3.2-Exp.d_qk": 64,
                 "DeepSeek-V3.2-Exp.d_v": 48, "DeepSeek-V3.2-Exp.indexer_heads": 4,
                 "DeepSeek-V3.2-Exp.indexer_dim": 32, "DeepSeek-V3.2-Exp.topk": 16}
        report = dsa.cost(compare_models=["DeepSeek-V3.2-Exp"], set=small, max_context=256,
                          calibrate=True, calibrate_seconds=0.001, device="cpu",
                          calibrate_positions=[32, 256], calibrate_tokens=2)
        measured = report["measured"]
        self.assertEqual((measured["device"], measured["positions"]), ("cpu", [32, 256]))
        point = measured["models"][0]["points"][1]
        self.assertEqual(point["position"], 256)
        decode = point["decode"]
        self.assertEqual([s["stage"] for s in decode["stages"]], ["indexer", "topk", "attention"])
        self.assertAlmostEqual(decode["seconds"],
                               sum(s["seconds"] for s in decode["stages"]) + decode["rest_seconds"],
                               delta=1e-12 * decode["seconds"])

    def test_errors(self):
        with self.assertRaises(dsa.UsageError) as caught:
            dsa.cost(hardware="no-such-gpu")
        self.assertIn("no hardware preset", str(caught.exception))
        with self.assertRaises(dsa.BadInputError):
            dsa.cost(presets="/nonexistent")
        for kwargs in [dict(max_context=0), dict(step=0), dict(format="xml"),
                       dict(compare_models=["DeepSeek-V3.2"], dsa_model="DeepSeek-V3.2"),
                       dict(baseline="DeepSeek-V3.2"), dict(set={"dsa.nonsense": 1}),
                       dict(device="cpu"), dict(calibrate_positions=[64]),
                       dict(calibrate=True, calibrate_positions=[64, 8]),
                       dict(calibrate=True, calibrate_tokens=0)]:
            with self.assertRaises(dsa.UsageError, msg=str(kwargs)):
                dsa.cost(**kwargs)


class Schemas(unittest.TestCase):
    def test_every_report_names_its_tools_schema(self):
        q, k, w = indexer_inputs(rng(11), 8, 8)
        self.assertEqual(dsa.score(q, k, w, report=True)[1]["schema"], "dsa-score/1")
        self.assertEqual(dsa.select(q, k, w, topk=2, report=True)[2]["schema"], "dsa-select/1")
        g = rng(12)
        qa = g.standard_normal((8, 2, 16)).astype(F32)
        kv = g.standard_normal((8, 16)).astype(F32)
        report = dsa.attend(qa, kv, d_v=8, dense=True, report=True)[2]
        self.assertEqual((report["schema"], report["mode"], report["layout"], report["scale_rule"]),
                         ("dsa-attend/1", "dense", "mqa", "d_qk^-0.5"))


class Errors(unittest.TestCase):
    def setUp(self):
        self.q, self.k, self.w = indexer_inputs(rng(9), 8, 8)

    def test_classes(self):
        self.assertTrue(issubclass(dsa.UsageError, dsa.Error) and issubclass(dsa.UsageError, ValueError))
        self.assertTrue(issubclass(dsa.BadInputError, ValueError))
        self.assertTrue(issubclass(dsa.RuntimeFailure, RuntimeError))
        self.assertEqual((dsa.RuntimeFailure.exit_code, dsa.UsageError.exit_code,
                          dsa.BadInputError.exit_code), (1, 2, 3))

    def test_usage_errors(self):
        q, k, w = self.q, self.k, self.w
        kv = np.zeros((8, 16), F32)
        cases = [
            (lambda: dsa.select(q, k, w, topk=0), "topk: must be an integer >= 1, got 0"),
            (lambda: dsa.select(q, k, w, topk=1 << 31), "topk: must be an integer <= 2147483647"),
            (lambda: dsa.score(q, k, w, precision="fp6"), "precision: "),
            (lambda: dsa.score(q, k, w, ue8m0=True), "ue8m0: ue8m0 applies to precision fp8 only"),
            (lambda: dsa.score(q[:, :, :12], k[:, :12], w, hadamard=True), "hadamard: "),
            (lambda: dsa.select(scores=np.zeros((2, 2), F32), precision="fp8"), "fused mode"),
            (lambda: dsa.attend(q, kv), "give indices, or dense=True"),
            (lambda: dsa.attend(q, kv, np.zeros((8, 2), np.int32), dense=True), "exclude each other"),
            (lambda: dsa.attend(q, kv, dense=True, k=kv), "kv excludes k and v"),
            (lambda: dsa.attend(q, kv, dense=True, d_v=99), "d_v: d_v must be in [1, d_qk = 16]"),
            (lambda: dsa.attend(q, kv, dense=True, d_v=8, scale="big"), "scale: softmax scale"),
            (lambda: dsa.attend(q, kv, dense=True, d_v=8, scale=-1.0), "scale: softmax scale must be"),
            (lambda: dsa.attend(q, kv, dense=True, window=4), "apply with attention="),
            (lambda: dsa.attend(q, kv, dense=True, attention="mla"), "attention: "),
            (lambda: dsa.compare(q, kv, q, k, w, d_v=8, topk=[16, 8]), "topk: the k values must be"),
            (lambda: dsa.compare(q, kv), "give the indexer"),
        ]
        for call, message in cases:
            with self.assertRaises(dsa.UsageError, msg=message) as caught:
                call()
            self.assertEqual(caught.exception.exit_code, 2)
            self.assertIn(message, str(caught.exception))

    def test_bad_input(self):
        q, k, w = self.q, self.k, self.w
        kv = np.zeros((8, 16), F32)
        cases = [
            (lambda: dsa.score(q, k[:, :8], w),
             "k_index (k_index): expected shape [Lk, 16] to match q_index [8, 4, 16], got [8, 8]"),
            (lambda: dsa.attend(q, kv, np.full((8, 2), 9, np.int32), d_v=8),
             "indices: row 0 (query position 0) selects 9: entries must be -1 or in [0, 0]"),
            (lambda: dsa.attend(q, kv, np.zeros((8, 2), np.float32), d_v=8),
             "indices: token indices must be i32 or i64, got f32"),
            (lambda: dsa.attend(q, kv, np.zeros((8, 2), np.int32), d_v=8), "selects position 0 twice"),
            (lambda: dsa.compare(q, kv, q, k, w, d_v=8, needles=np.zeros((2, 3), np.int64)),
             "(needles): expected shape [N, 2]"),
        ]
        for call, message in cases:
            with self.assertRaises(dsa.BadInputError, msg=message) as caught:
                call()
            self.assertEqual(caught.exception.exit_code, 3)
            self.assertIn(message, str(caught.exception))

    def test_runtime_and_memory(self):
        if not dsa.cuda_available():
            with self.assertRaises(dsa.RuntimeFailure) as caught:
                dsa.score(self.q, self.k, self.w, device="cuda")
            self.assertEqual(caught.exception.exit_code, 1)
            self.assertTrue(str(caught.exception).startswith("device: device cuda: "))
            self.assertEqual(dsa.devices(), ["cpu"])
        scores, report = dsa.score(self.q, self.k, self.w, device="auto", report=True)
        if not dsa.cuda_available():
            np.testing.assert_array_equal(scores, dsa.score(self.q, self.k, self.w))
            self.assertIn("ran on the CPU", report["device_note"])
        with self.assertRaises(MemoryError):  # [65536, 2^31 - 1] int32 indices: 512 TiB
            dsa.select(scores=np.zeros((1 << 16, 1), F32), topk=(1 << 31) - 1)


class Threads(unittest.TestCase):
    def test_gil_is_released_while_computing(self):
        g = rng(10)
        q = g.standard_normal((2048, 8, 64)).astype(F32)
        kv = g.standard_normal((2048, 64)).astype(F32)
        result = {}

        def work():
            dsa.set_threads(1)  # OpenMP's setting is per thread: this one's, long enough anywhere
            result["out"] = dsa.attend(q, kv, d_v=64, dense=True)
        worker = threading.Thread(target=work)
        start = time.perf_counter()
        worker.start()
        spins = 0
        while worker.is_alive():
            spins += 1
        elapsed = time.perf_counter() - start
        worker.join()
        self.assertIn("out", result)
        if elapsed < 0.02:
            self.skipTest(f"the computation took {elapsed * 1e3:.1f} ms: too short to tell")
        # With the GIL held for the whole computation this loop could not run at all.
        self.assertGreater(spins, 1000, f"{spins} iterations in {elapsed:.3f} s")
        print(f"\n{spins} iterations of this thread in {elapsed * 1e3:.0f} ms of the library's",
              end=" ")

    def test_threads_setting(self):
        before = dsa.threads()
        dsa.set_threads(1)
        self.assertEqual(dsa.threads(), 1)
        dsa.set_threads(before)
        self.assertEqual(dsa.threads(), before)
        self.assertIn(dsa.cpu_kernels(), dsa.available_cpu_kernels())


if __name__ == "__main__":
    unittest.main()
