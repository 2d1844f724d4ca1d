"""PyTorch tensors in (CPU: through DLPack, without copies; bfloat16 too), NumPy arrays out that
torch.from_numpy shares, and the README's example. Skipped where torch is not installed (Debian's
CI has none: scripts/install-deps.sh --bench installs python3-torch)."""
import unittest

import numpy as np

import refs
from refs import F32, import_dsa

dsa = import_dsa()
try:
    import torch
except ImportError:
    torch = None


@unittest.skipIf(torch is None, "torch is not installed")
class Torch(unittest.TestCase):
    def setUp(self):
        self.threads = dsa.threads()
        self.g = torch.Generator().manual_seed(int.from_bytes(np.random.bytes(4), "little"))

    def tearDown(self):
        dsa.set_threads(self.threads)  # importing torch may have set libgomp's thread count

    def randn(self, *shape, dtype=None):
        return torch.randn(*shape, generator=self.g).to(dtype or torch.float32)

    def test_cpu_tensors_are_viewed(self):
        for dtype, name in [(torch.float32, "f32"), (torch.float64, "f64"), (torch.float16, "f16"),
                            (torch.bfloat16, "bf16"), (torch.int32, "i32"), (torch.int64, "i64"),
                            (torch.uint8, "u8")]:
            t = self.randn(3, 4, dtype=dtype)
            info = dsa._tensor_info(t)
            self.assertEqual((info["dtype"], info["data"], info["copied"]), (name, t.data_ptr(), False))
        t = self.randn(4, 6)
        self.assertTrue(dsa._tensor_info(t.T)["copied"])
        self.assertEqual(dsa._tensor_info(t[1:3])["data"], t[1:3].data_ptr())

    def test_same_results_as_numpy(self):
        q, k, w = self.randn(16, 4, 32), self.randn(16, 32), self.randn(16, 4)
        np.testing.assert_array_equal(dsa.score(q, k, w), dsa.score(q.numpy(), k.numpy(), w.numpy()))
        qb, kb = q.bfloat16(), k.bfloat16()
        ref, bound = refs.indexer_scores(qb.float().numpy(), kb.float().numpy(), w.numpy(), "bf16")
        got = dsa.score(qb, kb, w, precision="bf16")
        np.testing.assert_array_equal(got, dsa.score(refs.bf16(q.numpy()), refs.bf16(k.numpy()), w.numpy(),
                                                     precision="bf16"))
        visible = np.isfinite(ref)
        np.testing.assert_array_equal(np.isfinite(got), visible)
        err = np.abs(got.astype(np.float64)[visible] - ref[visible])
        self.assertTrue(np.all(err <= 2e-5 * np.broadcast_to(bound[:, None], ref.shape)[visible]))
        idx, _ = dsa.select(qb, kb, w, topk=4)
        out, lse = dsa.attend(self.randn(16, 2, 32), self.randn(16, 32), torch.from_numpy(idx).long(), d_v=32)
        shared = torch.from_numpy(out)
        self.assertEqual(shared.data_ptr(), out.ctypes.data)
        self.assertEqual(tuple(shared.shape), (16, 2, 32))

    def test_refusals(self):
        t = self.randn(8, 4, 16).requires_grad_()
        with self.assertRaises((RuntimeError, BufferError)) as caught:  # torch's: it will not export
            dsa.score(t, self.randn(8, 16), self.randn(8, 4))
        self.assertIn("detach", str(caught.exception))
        if torch.cuda.is_available():
            with self.assertRaises(dsa.BadInputError) as caught:
                dsa.score(self.randn(8, 4, 16).cuda(), self.randn(8, 16), self.randn(8, 4))
            self.assertIn("q_index: a tensor on cuda:0", str(caught.exception))

    def test_readme_example(self):
        printed = []
        # ---- README "From Python" (print -> printed.append)
        torch.manual_seed(0)
        L, H, d_qk, d_v = 1024, 16, 576, 512  # MLA's latent cache and heads (DeepSeek-V3.2: H = 128)
        H_I, d_I = 64, 128                    # the lightning indexer's heads and width
        q, kv = torch.randn(L, H, d_qk), torch.randn(L, d_qk)
        q_index = torch.randn(L, H_I, d_I, dtype=torch.bfloat16)
        k_index = torch.randn(L, d_I, dtype=torch.bfloat16)
        weights = torch.randn(L, H_I)
        indexer = dict(precision="fp8", hadamard=True)  # the released model's fp8 indexer

        # Top-k of the indexer's scores, fused (never stores L x L): int32 [L, k], -1 padding.
        indices, scores = dsa.select(q_index, k_index, weights, topk=256, **indexer)
        # Sparse MLA attention over the selection; torch.from_numpy shares the output buffers.
        out, lse = dsa.attend(q, kv, indices, d_v=d_v, scale="deepseek-v3.2")
        out, lse = torch.from_numpy(out), torch.from_numpy(lse)  # [L, H, d_v], [L, H]
        # What the selection loses against dense attention, at several k in one pass.
        report = dsa.compare(q, kv, q_index, k_index, weights, d_v=d_v, scale="deepseek-v3.2",
                             topk=[64, 256], **indexer)
        for r in report["results"]:
            printed.append(f"k={r['topk']}: mass recall {r['mass_recall']['sparse']['mean']:.3f}")
        # ----
        self.assertEqual(tuple(out.shape), (L, H, d_v))
        self.assertEqual(len(printed), 2)
        same = dsa.compare(q, kv, indices=indices, d_v=d_v, scale="deepseek-v3.2")
        self.assertAlmostEqual(same["results"][0]["mass_recall"]["sparse"]["mean"],
                               report["results"][1]["mass_recall"]["sparse"]["mean"], places=6)


if __name__ == "__main__":
    unittest.main()
