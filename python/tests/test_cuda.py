"""device="cuda" against the CPU on fresh random inputs (tests/test_cuda.cpp's tolerances: the
GPU sums in another order, on bf16 and fp8 tensor cores). Skipped where this build has no CUDA
backend or there is no GPU."""
import os
import unittest

import numpy as np

from refs import F32, F64, import_dsa, indexer_inputs, rng

dsa = import_dsa()


def relative_l2(got, ref):
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    got, ref = got[finite].astype(F64), ref[finite].astype(F64)
    return np.sqrt(np.sum((got - ref) ** 2) / np.sum(ref ** 2))


@unittest.skipUnless(dsa.cuda_available(), "no CUDA backend in this build, or no GPU")
class Cuda(unittest.TestCase):
    def setUp(self):
        self.seed = int.from_bytes(os.urandom(4), "little")
        self.g = rng(self.seed)

    def test_devices(self):
        self.assertTrue(dsa.has_cuda)
        self.assertEqual(dsa.devices(), ["cpu", "cuda"])
        _, report = dsa.score(*indexer_inputs(self.g, 8, 8, H=64, d=128), device="cuda", report=True)
        self.assertTrue(report["device"].startswith("cuda:"))

    def test_indexer_and_selection(self):
        q, k, w = indexer_inputs(self.g, 300, 300, H=64, d=128)
        for precision, hadamard in [("fp8", True), ("bf16", False)]:
            cpu = dsa.score(q, k, w, precision=precision, hadamard=hadamard)
            gpu = dsa.score(q, k, w, precision=precision, hadamard=hadamard, device="cuda")
            self.assertLess(relative_l2(gpu, cpu), 2e-3, f"{precision} (seed {self.seed})")
            idx_c, sel_c = dsa.select(q, k, w, topk=32, precision=precision, hadamard=hadamard)
            idx_g, sel_g = dsa.select(q, k, w, topk=32, precision=precision, hadamard=hadamard,
                                      device="cuda")
            np.testing.assert_array_equal(idx_g == -1, idx_c == -1)
            # the same sets but for near-ties at the 32nd score
            kth = np.where(idx_c >= 0, sel_c, np.inf).min(-1)
            scale = np.max(np.abs(np.where(np.isfinite(cpu), cpu, 0)), -1)
            for r in range(q.shape[0]):
                differ = set(idx_g[r]) ^ set(idx_c[r])
                for s in differ:
                    self.assertLess(abs(cpu[r, s] - kth[r]), 2e-3 * scale[r] + 1e-6,
                                    f"row {r} position {s} (seed {self.seed})")

    def test_attention(self):
        L, H, d_qk, d_v = 256, 16, 576, 512
        q = self.g.standard_normal((L, H, d_qk)).astype(F32)
        kv = self.g.standard_normal((L, d_qk)).astype(F32)
        qi, ki, w = indexer_inputs(self.g, L, L, H=64, d=128)
        idx, _ = dsa.select(qi, ki, w, topk=64, precision="fp8", hadamard=True)
        for kwargs in [dict(indices=idx), dict(dense=True)]:
            out_c, lse_c = dsa.attend(q, kv, d_v=d_v, scale="deepseek-v3.2", **kwargs)
            out_g, lse_g = dsa.attend(q, kv, d_v=d_v, scale="deepseek-v3.2", device="cuda", **kwargs)
            self.assertLess(relative_l2(out_g, out_c), 1e-2, str(kwargs.keys()))
            # bf16 operands on the tensor cores: logits of 576-wide products err by ~1e-2
            self.assertLess(np.max(np.abs(lse_g - lse_c)), 5e-2)
        cpu = dsa.compare(q, kv, qi, ki, w, d_v=d_v, topk=[32, 64], precision="fp8", hadamard=True)
        gpu = dsa.compare(q, kv, qi, ki, w, d_v=d_v, topk=[32, 64], precision="fp8", hadamard=True,
                          device="cuda")
        self.assertTrue(gpu["device"].startswith("cuda:"))
        for c, g in zip(cpu["results"], gpu["results"]):
            self.assertAlmostEqual(g["mass_recall"]["sparse"]["mean"],
                                   c["mass_recall"]["sparse"]["mean"], delta=5e-3)

    def test_limits_and_gpu_tensors(self):
        q = self.g.standard_normal((8, 2, 24)).astype(F32)
        kv = self.g.standard_normal((8, 24)).astype(F32)
        with self.assertRaises(dsa.UsageError) as caught:  # the GPU kernels' shapes are MLA's
            dsa.attend(q, kv, d_v=16, dense=True, device="cuda")
        self.assertTrue(str(caught.exception).startswith("device: device cuda: "))
        out, _, report = dsa.attend(q, kv, d_v=16, dense=True, device="auto", report=True)
        self.assertIn("ran on the CPU", report["device_note"])
        try:
            import torch
        except ImportError:
            return
        with self.assertRaises(dsa.BadInputError) as caught:
            dsa.attend(torch.from_numpy(q).cuda(), kv, d_v=16, dense=True)
        self.assertIn("q: a tensor on cuda:0", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
