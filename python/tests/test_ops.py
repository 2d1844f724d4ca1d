"""Every numeric path of the module against plain NumPy float64 references (refs.py, from
docs/DESIGN.md sections 1 and 6) on fresh random inputs, plus hand-computed edges."""
import os
import tempfile
import unittest

import numpy as np

import refs
from refs import F32, F64, NEG_INF, import_dsa, indexer_inputs, rng

dsa = import_dsa()

SCORE_TOL = 2e-5  # |got - ref| <= SCORE_TOL * the row's sum of |terms| (f32 accumulation)
ATTN_TOL = 2e-5


def seed():
    return int.from_bytes(os.urandom(4), "little")


class Fresh(unittest.TestCase):
    """Fresh random inputs per run; the seed is in every failure message."""

    def setUp(self):
        self.seed = seed()
        self.g = rng(self.seed)

    def assert_scores(self, got, ref, bound, what):
        got = np.asarray(got, dtype=F64)
        masked = ref == NEG_INF
        np.testing.assert_array_equal(got == NEG_INF, masked, f"{what}: mask (seed {self.seed})")
        err = np.where(masked, 0.0, np.abs(np.where(masked, 0.0, got) - np.where(masked, 0.0, ref)))
        tol = SCORE_TOL * np.maximum(bound, 1e-30)[..., None]
        worst = np.max(err / tol) if err.size else 0.0
        self.assertLessEqual(worst, 1.0, f"{what}: error {worst:.3g} x tolerance (seed {self.seed})")

    def assert_close(self, got, ref, what, tol=ATTN_TOL):
        got, ref = np.asarray(got, dtype=F64), np.asarray(ref, dtype=F64)
        scale = max(np.max(np.abs(ref[np.isfinite(ref)]), initial=0.0), 1.0)
        both_inf = np.isneginf(got) & np.isneginf(ref)
        err = np.max(np.abs(np.where(both_inf, 0.0, got - ref)), initial=0.0)
        self.assertLessEqual(err, tol * scale, f"{what}: max error {err:.3g} (seed {self.seed})")


class Score(Fresh):
    def test_f32_prefill_decode_batched(self):
        for Lq, Lk, batch in [(24, 24, None), (5, 40, None), (9, 17, 3)]:
            q, k, w = indexer_inputs(self.g, Lq, Lk, H=4, d=16, batch=batch)
            ref, bound = refs.indexer_scores(q, k, w)
            got = dsa.score(q, k, w)
            self.assertEqual(got.shape, ref.shape)
            self.assertEqual(got.dtype, np.float32)
            self.assert_scores(got, ref, bound, f"f32 Lq={Lq} Lk={Lk} B={batch}")

    def test_precisions_and_released_steps(self):
        q, k, w = indexer_inputs(self.g, 20, 20, H=8, d=64)
        q[:, :, 3] *= 20  # outlier channels, which the rotation spreads
        k[:, 5] *= 20
        for precision, hadamard, ue8m0, raw in [("bf16", False, False, False),
                                                ("fp8", False, False, False),
                                                ("fp8", False, True, False),
                                                ("fp8", True, False, False),
                                                ("fp8", True, True, True),
                                                ("bf16", True, False, True),
                                                ("f32", False, False, True)]:
            ref, bound = refs.indexer_scores(q, k, w, precision, hadamard, ue8m0, raw)
            got = dsa.score(q, k, w, precision=precision, hadamard=hadamard, ue8m0=ue8m0,
                            raw_weights=raw)
            self.assert_scores(got, ref, bound, f"{precision} hadamard={hadamard} ue8m0={ue8m0} "
                                                f"raw_weights={raw}")

    def test_hadamard_leaves_f32_scores(self):
        q, k, w = indexer_inputs(self.g, 16, 16, H=2, d=32)
        ref, bound = refs.indexer_scores(q, k, w)
        got = dsa.score(q, k, w, hadamard=True)
        self.assertTrue(np.allclose(refs.hadamard_f32(k), k.astype(F64) @ refs.sylvester(32), atol=1e-5))
        self.assert_scores(got, ref, 10 * bound, "f32 hadamard")

    def test_compressed_keys(self):
        T, Lq, ratio = 37, 6, 4
        q, _, w = indexer_inputs(self.g, Lq, 1, H=2, d=16)
        k = self.g.standard_normal((T // ratio, 16)).astype(F32)
        ref, bound = refs.indexer_scores(q, k, w, ratio=ratio, tokens=T)
        got = dsa.score(q, k, w, compress_ratio=ratio, tokens=T)
        self.assert_scores(got, ref, bound, "compressed keys")

    def test_report(self):
        q, k, w = indexer_inputs(self.g, 8, 8)
        scores, report = dsa.score(q, k, w, precision="bf16", report=True)
        self.assertEqual(report["tool"], "dsa-score")
        self.assertEqual(report["indexer"]["precision"], "bf16")
        self.assertEqual([i["name"] for i in report["inputs"]], ["q_index", "k_index", "weights"])
        self.assertEqual(report["outputs"][0]["shape"], list(scores.shape))
        self.assertIn("total", report["timings_ms"])

    def test_one_token_and_empty(self):
        q = np.array([[[1.0, 2.0]]], dtype=F32)  # Lq = 1, H = 1, d = 2
        k = np.array([[3.0, -1.0]], dtype=F32)
        w = np.array([[0.5]], dtype=F32)
        np.testing.assert_array_equal(dsa.score(q, k, w), [[0.5]])
        k[0] = [-3.0, 1.0]  # ReLU of a negative logit
        np.testing.assert_array_equal(dsa.score(q, k, w), [[0.0]])
        empty = dsa.score(np.zeros((0, 1, 2), F32), np.zeros((0, 2), F32), np.zeros((0, 1), F32))
        self.assertEqual(empty.shape, (0, 0))


class Select(Fresh):
    def test_fused_against_the_reference(self):
        for Lq, Lk, k, batch, precision in [(40, 40, 8, None, "f32"), (7, 64, 16, 2, "f32"),
                                            (30, 30, 50, None, "f32"), (32, 32, 6, None, "fp8")]:
            q, kk, w = indexer_inputs(self.g, Lq, Lk, H=4, d=32, batch=batch)
            ref, bound = refs.indexer_scores(q, kk, w, precision)
            idx, sel = dsa.select(q, kk, w, topk=k, precision=precision)
            self.assertEqual(idx.shape, ref.shape[:-1] + (k,))
            ref_idx, ref_sel = refs.topk_rows(ref, k)
            # Equal but for near-ties at the k-th score (the kernel sums in its own order).
            near = np.abs(ref_sel - np.take_along_axis(ref, np.maximum(idx, 0), -1))
            tol = SCORE_TOL * bound[..., None]
            ok = (idx == ref_idx) | (near <= 2 * tol)
            self.assertTrue(ok.all(), f"selection (seed {self.seed})")
            np.testing.assert_array_equal(idx == -1, ref_idx == -1)
            self.assert_scores(np.where(idx == -1, NEG_INF, sel), np.where(idx == -1, NEG_INF, ref_sel),
                               bound, "selected scores")
            # the fused pipeline selects what the score matrix gives
            from_scores = dsa.select(scores=dsa.score(q, kk, w, precision=precision), topk=k)
            np.testing.assert_array_equal(from_scores[0], idx)

    def test_from_scores_exactly(self):
        s = self.g.standard_normal((3, 12, 20)).astype(F32)
        for t in range(12):
            s[:, t, 20 - 12 + t + 1:] = NEG_INF  # a causal score matrix, as dsa.score writes it
        s[0, 5, 2] = s[0, 5, 7] = s[0, 5, 1] = 9.0  # a tie: lower position first
        s[1, 0, 4] = np.nan  # NaN ranks last (row 0 sees 9 keys)
        idx, sel = dsa.select(scores=s, topk=9)
        ref_idx, ref_sel = refs.topk_rows(s, 9)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(sel, ref_sel)
        np.testing.assert_array_equal(idx[0, 5, :3], [1, 2, 7])
        self.assertTrue(np.isnan(sel[1, 0, 8]) and idx[1, 0, 8] == 4)

    def test_hand_computed_edges(self):
        s = np.full((4, 4), NEG_INF, dtype=F32)
        for t in range(4):
            s[t, :t + 1] = 1.0  # all equal
        idx, sel = dsa.select(scores=s, topk=3)
        np.testing.assert_array_equal(idx, [[0, -1, -1], [0, 1, -1], [0, 1, 2], [0, 1, 2]])
        np.testing.assert_array_equal(sel[0], [1.0, NEG_INF, NEG_INF])
        one = dsa.select(scores=np.array([[2.5]], F32), topk=1)
        np.testing.assert_array_equal(one[0], [[0]])

    def test_report(self):
        q, k, w = indexer_inputs(self.g, 8, 8)
        _, _, report = dsa.select(q, k, w, topk=3, report=True)
        self.assertEqual((report["tool"], report["mode"], report["topk"]), ("dsa-select", "fused", 3))
        _, _, report = dsa.select(scores=dsa.score(q, k, w), topk=3, report=True)
        self.assertEqual(report["mode"], "scores")


class ProjectIndexer(Fresh):
    def test_against_the_reference(self):
        d_model, H, d, L = 12, 3, 8, 10
        wq = self.g.standard_normal((H * d, d_model)).astype(F32)
        wk = self.g.standard_normal((d, d_model)).astype(F32)
        gamma = self.g.standard_normal(d).astype(F32)
        beta = self.g.standard_normal(d).astype(F32)
        wp = self.g.standard_normal((H, d_model)).astype(F32)
        hidden = self.g.standard_normal((L, d_model)).astype(F32)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "indexer.safetensors")
            refs.write_safetensors(path, {"m.wq_b.weight": wq, "m.wk.weight": wk,
                                          "m.k_norm.weight": gamma, "m.k_norm.bias": beta,
                                          "m.weights_proj.weight": wp})
            q_index, k_index, weights = dsa.project_indexer(hidden, path, prefix="m.")
            with self.assertRaises(dsa.BadInputError):
                dsa.project_indexer(hidden, path)  # no such names without the prefix
        h = hidden.astype(F64)
        x = h @ wk.T.astype(F64)
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
        self.assert_close(q_index, (h @ wq.T.astype(F64)).reshape(L, H, d), "q_index", 1e-5)
        self.assert_close(k_index, x * gamma + beta, "k_index", 1e-5)
        self.assert_close(weights, h @ wp.T.astype(F64), "weights", 1e-5)


def random_selection(g, Lq, Lk, k):
    """Distinct visible positions per row, -1 padded (in random order)."""
    idx = np.full((Lq, k), -1, dtype=np.int32)
    for t in range(Lq):
        p = Lk - Lq + t
        chosen = g.choice(p + 1, size=min(k, p + 1), replace=False)
        idx[t, :len(chosen)] = chosen
        g.shuffle(idx[t])
    return idx


class Attend(Fresh):
    def test_mqa_sparse_and_dense(self):
        Lq, Lk, H, d_qk, d_v, k = 12, 20, 4, 24, 16, 6
        q = self.g.standard_normal((Lq, H, d_qk)).astype(F32)
        kv = self.g.standard_normal((Lk, d_qk)).astype(F32)
        idx = random_selection(self.g, Lq, Lk, k)
        keys, values = refs.mqa_heads(kv, H, d_v)
        scale = d_qk ** -0.5
        ref_out, ref_lse = refs.attention(q, keys, values, lambda t: idx[t][idx[t] >= 0], scale)
        out, lse = dsa.attend(q, kv, idx, d_v=d_v)
        self.assertEqual(out.shape, (Lq, H, d_v))
        self.assertEqual(lse.shape, (Lq, H))
        self.assert_close(out, ref_out, "sparse out")
        self.assert_close(lse, ref_lse, "sparse lse")
        ref_out, ref_lse = refs.attention(q, keys, values, lambda t: range(Lk - Lq + t + 1), scale)
        out, lse = dsa.attend(q, kv, d_v=d_v, dense=True)
        self.assert_close(out, ref_out, "dense out")
        self.assert_close(lse, ref_lse, "dense lse")

    def test_mha_gqa_batched(self):
        B, L, H, H_kv, d_qk, d_v, k = 2, 10, 4, 2, 8, 6, 4
        q = self.g.standard_normal((B, L, H, d_qk)).astype(F32)
        kk = self.g.standard_normal((B, L, H_kv, d_qk)).astype(F32)
        v = self.g.standard_normal((B, L, H_kv, d_v)).astype(F32)
        idx = np.stack([random_selection(self.g, L, L, k) for _ in range(B)]).astype(np.int64)
        out, lse = dsa.attend(q, indices=idx, k=kk, v=v, scale=0.3)
        for b in range(B):
            keys, values = refs.mha_heads(kk[b], v[b], H)
            ref_out, ref_lse = refs.attention(q[b], keys, values, lambda t: idx[b, t][idx[b, t] >= 0], 0.3)
            self.assert_close(out[b], ref_out, f"mha out {b}")
            self.assert_close(lse[b], ref_lse, f"mha lse {b}")

    def test_scales(self):
        q = self.g.standard_normal((6, 2, 8)).astype(F32)
        kv = self.g.standard_normal((6, 8)).astype(F32)
        keys, values = refs.mqa_heads(kv, 2, 8)
        for scale, value in [(None, 8 ** -0.5), ("default", 8 ** -0.5), (0.7, 0.7),
                             ("deepseek-v3.2", refs.deepseek_v32_scale())]:
            out, lse, report = dsa.attend(q, kv, d_v=8, dense=True, scale=scale, report=True)
            ref_out, ref_lse = refs.attention(q, keys, values, lambda t: range(t + 1), value)
            self.assert_close(out, ref_out, f"scale {scale}")
            self.assertAlmostEqual(report["scale"], value, places=6)
        self.assertEqual(report["scale_rule"], "deepseek-v3.2")

    def test_padding_rows_and_future_entries(self):
        q = self.g.standard_normal((4, 2, 8)).astype(F32)
        kv = self.g.standard_normal((4, 8)).astype(F32)
        idx = np.array([[-1, -1], [1, 0], [2, -1], [3, 1]], dtype=np.int32)
        out, lse = dsa.attend(q, kv, idx, d_v=8)
        np.testing.assert_array_equal(out[0], 0.0)
        self.assertTrue(np.isneginf(lse[0]).all())
        released = np.array([[0, 3], [1, 0], [2, 3], [3, 1]], dtype=np.int32)  # future entries
        with self.assertRaises(dsa.BadInputError) as caught:
            dsa.attend(q, kv, released, d_v=8)
        self.assertIn("entries must be -1 or in [0, 0]", str(caught.exception))
        dropped, _, report = dsa.attend(q, kv, released, d_v=8, future_as_padding=True, report=True)
        self.assertEqual(report["future_entries_dropped"], 2)
        keys, values = refs.mqa_heads(kv, 2, 8)
        ref, _ = refs.attention(q, keys, values,
                                lambda t: [s for s in released[t] if 0 <= s <= t], 8 ** -0.5)
        self.assert_close(dropped, ref, "future entries as padding")


class Fp8KvCache(Fresh):
    """FlashMLA's fp8 cache (DESIGN.md section 7) against a NumPy transcription of its
    quantize_k_cache: bf16 values, per 128 a power-of-two scale 2^ceil(log2(max(amax/448, 1e-4))),
    e4m3 codes of value / scale; the rope values kept in bf16."""

    def reference(self, kv):
        x = refs.bf16(kv.astype(F32)).astype(F64)
        latent = x[..., :512].reshape(x.shape[:-1] + (4, 128))
        amax = np.max(np.abs(latent), axis=-1)
        scale = np.exp2(np.ceil(np.log2(np.maximum(amax / 448.0, 1e-4))))
        values = refs.e4m3(latent / scale[..., None]) * scale[..., None]
        return np.concatenate([values.reshape(x.shape[:-1] + (512,)), x[..., 512:]], axis=-1), scale

    def test_layout_values_and_attention(self):
        L, Lq, H, k = 40, 10, 4, 12
        kv = self.g.standard_normal((L, 576)).astype(F32)
        kv[:, 128:256] *= 1e-3  # tiles of different amplitude: different scales
        cache = dsa.quantize_kv_cache(kv)
        self.assertEqual((cache.dtype, cache.shape), (np.uint8, (L, 656)))
        want, scale = self.reference(kv)
        np.testing.assert_array_equal(cache[:, 512:528].copy().view(np.float32), scale.astype(F32),
                                      f"scales (seed {self.seed})")
        np.testing.assert_array_equal(cache[:, 528:].copy().view(np.uint16), refs.bf16_bits(kv[:, 512:]))
        rows = dsa.dequantize_kv_cache(cache)
        np.testing.assert_array_equal(rows.astype(F64), want, f"dequantized rows (seed {self.seed})")
        q = self.g.standard_normal((Lq, H, 576)).astype(F32) * F32(0.05)
        idx = random_selection(self.g, Lq, L, k)
        out, lse = dsa.attend(q, kv, idx, kv_cache="fp8")
        from_cache, lse_cache = dsa.attend(q, cache, idx)
        np.testing.assert_array_equal(out, from_cache)
        np.testing.assert_array_equal(lse, lse_cache)
        keys, values = refs.mqa_heads(want, H, 512)
        ref_out, ref_lse = refs.attention(q, keys, values, lambda t: idx[t][idx[t] >= 0],
                                          576 ** -0.5)
        self.assert_close(out, ref_out, "fp8 cache out")
        self.assert_close(lse, ref_lse, "fp8 cache lse")

    def test_compare_reports_the_loss(self):
        L, H, k = 48, 2, 8
        kv = self.g.standard_normal((L, 576)).astype(F32)
        q = self.g.standard_normal((L, H, 576)).astype(F32) * F32(0.05)
        idx = random_selection(self.g, L, L, k)
        report = dsa.compare(q, kv, indices=idx, kv_cache="fp8")
        self.assertEqual(report["kv_cache"], "fp8")
        loss = report["results"][0]["kv_cache_loss"]
        fp8, _ = dsa.attend(q, kv, idx, kv_cache="fp8")
        bf16, _ = dsa.attend(q, kv, idx)
        diff = fp8.astype(F64) - bf16
        want = np.sqrt(np.sum(diff * diff) / np.sum(bf16.astype(F64) ** 2))
        self.assertAlmostEqual(loss["out_rel_err_global"], want, delta=1e-6 * want)
        with self.assertRaises(dsa.UsageError):
            dsa.compare(q, dsa.quantize_kv_cache(kv), indices=idx, kv_cache="fp8")
        with self.assertRaises(dsa.BadInputError):
            dsa.dequantize_kv_cache(np.zeros((3, 600), np.uint8))


class AttendV4(Fresh):
    def setUp(self):
        super().setUp()
        self.T, self.Lq, self.H, self.d, self.window = 40, 9, 2, 16, 8
        self.q = self.g.standard_normal((self.Lq, self.H, self.d)).astype(F32)
        self.kv = self.g.standard_normal((self.T, self.d)).astype(F32)
        self.sink = self.g.standard_normal(self.H).astype(F32)

    def reference(self, ratio, entries, chosen):
        """Window tokens then the chosen visible entries, one softmax with the sink."""
        rows = np.concatenate([self.kv, entries]).astype(F64)
        keys = np.broadcast_to(rows, (self.H,) + rows.shape)

        def selection(r):
            t = self.T - self.Lq + r
            window = list(range(max(0, t - self.window + 1), t + 1))
            visible = (t + 1) // ratio if ratio else 0
            return window + [self.T + j for j in chosen(r, visible)]
        return refs.attention(self.q, keys, keys, selection, self.d ** -0.5, self.sink)

    def test_csa_hca_swa(self):
        c4 = self.g.standard_normal((self.T // 4, self.d)).astype(F32)
        idx = np.full((self.Lq, 3), -1, dtype=np.int32)
        for r in range(self.Lq):
            visible = (self.T - self.Lq + r + 1) // 4
            chosen = self.g.choice(visible, size=min(3, visible), replace=False)
            idx[r, :len(chosen)] = chosen
        cases = [
            ("csa", c4, dict(indices=idx), 4, lambda r, n: [j for j in idx[r] if j >= 0]),
            ("csa", c4, dict(dense=True), 4, lambda r, n: range(n)),
            ("swa", None, {}, 0, lambda r, n: []),
        ]
        for kind, entries, extra, ratio, chosen in cases:
            out, lse = dsa.attend(self.q, self.kv, attention=kind, compressed=entries,
                                  sink=self.sink, window=self.window, **extra)
            ref_out, ref_lse = self.reference(ratio, entries if entries is not None else
                                              np.zeros((0, self.d), F32), chosen)
            self.assert_close(out, ref_out, f"{kind} {extra.keys()} out")
            self.assert_close(lse, ref_lse, f"{kind} lse")
        T = 300  # HCA's ratio 128 needs more tokens
        kv = self.g.standard_normal((T, self.d)).astype(F32)
        entries = self.g.standard_normal((T // 128, self.d)).astype(F32)
        self.kv, self.T = kv, T
        out, lse = dsa.attend(self.q, kv, attention="hca", compressed=entries, sink=self.sink,
                              window=self.window)
        ref_out, ref_lse = self.reference(128, entries, lambda r, n: range(n))
        self.assert_close(out, ref_out, "hca out")
        self.assert_close(lse, ref_lse, "hca lse")

    def test_fp8_caches(self):
        """kv_cache="fp8" with attention=: V4's fp8 caches of kv and compressed (584 bytes a row),
        in attend and in compare's kv_cache_loss, against the same selection over the values."""
        T, Lq, H, d, k = 80, 6, 2, 512, 5
        q = self.g.standard_normal((Lq, H, d)).astype(F32) * F32(0.05)
        kv = self.g.standard_normal((T, d)).astype(F32)
        c4 = self.g.standard_normal((T // 4, d)).astype(F32)
        idx = np.full((Lq, k), -1, dtype=np.int32)
        for r in range(Lq):
            visible = (T - Lq + r + 1) // 4
            idx[r, :k] = self.g.choice(visible, size=k, replace=False)
        args = dict(attention="csa", compressed=c4, sink=self.sink, indices=idx)
        fp8, fp8_lse = dsa.attend(q, kv, kv_cache="fp8", **args)
        values, _ = dsa.attend(q, kv, **args)
        diff = fp8.astype(F64) - values
        want = np.sqrt(np.sum(diff * diff) / np.sum(values.astype(F64) ** 2))
        self.assertTrue(1e-3 < want < 0.1, want)  # the caches round the values, a little
        self.assertTrue(np.all(np.isfinite(fp8_lse)))
        report = dsa.compare(q, kv, kv_cache="fp8", reference="dense", **args)
        self.assertEqual(report["kv_cache"], "fp8")
        loss = report["results"][0]["kv_cache_loss"]["out_rel_err_global"]
        self.assertAlmostEqual(loss, want, delta=1e-5 * want)
        self.assertNotIn("kv_cache_loss", dsa.compare(q, kv, reference="dense", **args)["results"][0])


if __name__ == "__main__":
    unittest.main()
