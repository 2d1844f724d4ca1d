#!/usr/bin/env python3
"""Independent NumPy (float64) computation of every dsa-compare metric, checked against its report.

DESIGN.md section 2 and dsa-compare(1), METRICS and REPORT. For each case (seeded random .npy
inputs, prefill and decode, MQA --kv/--dv and MHA/GQA --k/--v, with and without a batch
dimension, plus one dsa-gen workload with its needles), the script

  * runs dsa-score (f32 scores, -inf masked) and dsa-select at the largest k with the same
    indexer inputs and options: the selection is taken from the binaries, so near-ties of the
    indexer scores cannot make the two sides select differently;
  * computes here, in float64 from the inputs as read (f32), the scores S.npy and the selection
    I.npy: the dense and sparse attention outputs, out_rel_err, out_cosine, mass_recall_head,
    mass_recall, topk_recall, kl_dense (Eq. 3), kl_sparse (Eq. 4), needle_recall, the
    sparse/exact summaries (count, undefined, mean, p50, p90, p99, min, max), out_rel_err_global,
    the position buckets, the row counts and the flop counts;
  * compares them with `dsa-compare` in indexer mode (-k K or --sweep-topk K1,K2,..., S_t the
    first min(k, t+1) entries of the selection at the largest k) and in --indices mode (the
    selection file, and its prefixes of width k for the smaller k of a sweep).

Tolerances (|got - ref| <= atol + rtol * |ref|): probabilities, recalls and cosines atol 2e-5,
rtol 2e-5; KL losses rtol 1e-4, atol 1e-6 (a floor for rows whose KL is 0 or tiny); output
errors rtol 1e-4, atol 1e-5 (a floor: the tool's outputs are f32, so ||o_sparse - o_dense|| carries
an absolute rounding error of about 1e-7 * sum_s P[t,s] ||v_s||, which exceeds 1e-7 ||o_dense|| where
the values cancel; on exact rows, whose error here is ~1e-16, the tool reports up to ~2e-6). p99/min/max are compared with the same tolerance.

topk_recall: the oracle TopK_k(p) is taken on p in float64 here and on the f32 p in the tool, so
near-equal p values may be ordered differently. For a row whose k-th and (k+1)-th largest p are
within TIE_BAND (1e-6) of each other, the recall is an interval (the positions within the band of
the boundary may be in or out of the oracle set); every summary statistic is monotone in the row
values, so the report must lie within [stat(low), stat(high)] (with the tolerance). Such rows
are counted and printed; at most MAX_TIE_ROWS per results entry are allowed.

Usage: python3 tests/numpy_compare_check.py --bin DIR [--keep] [--self-test]
  --self-test  also perturbs single NumPy values (one row of a metric, a needle count, a row
               count) and requires each perturbation to be reported as a mismatch.
Exit status: 0 all checks passed, 1 a mismatch or a failed run, 77 numpy is missing.
"""

import argparse
import copy
import json
import math
import os
import shutil
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pycheck import Checks, RunFailure, run_tool  # noqa: E402

try:
    import numpy as np
except ImportError:
    print("numpy_compare_check: numpy is not available; skipping", file=sys.stderr)
    sys.exit(77)

F32 = np.float32
F64 = np.float64
TIE_BAND = 1e-6
MAX_TIE_ROWS = 3
STATS = ("mean", "p50", "p90", "p99", "min", "max")

# metric -> (atol, rtol)
TOL = {
    "out_rel_err": (1e-5, 1e-4),
    "out_rel_err_global": (1e-5, 1e-4),
    "out_cosine": (2e-5, 2e-5),
    "mass_recall_head": (2e-5, 2e-5),
    "mass_recall": (2e-5, 2e-5),
    "topk_recall": (2e-5, 2e-5),
    "needle_recall": (2e-5, 2e-5),
    "kl_dense": (1e-6, 1e-4),
    "kl_sparse": (1e-6, 1e-4),
    "flops": (0.0, 1e-12),
}
ROW_METRICS = ("out_rel_err", "out_cosine", "mass_recall_head", "mass_recall", "topk_recall",
               "kl_dense", "kl_sparse")
BUCKET_METRICS = ("out_rel_err", "out_cosine", "mass_recall", "topk_recall", "kl_sparse", "kl_dense")

CHECKS = Checks()




def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    dtypes = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I32": "<i4", "I64": "<i8"}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(blob[8 + n + a:8 + n + b], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


# ------------------------------------------------------------------------------------------
# The reference: per-row metrics in float64

def summary(values):
    """dsa-compare(1) 'Each summary', in float64. Values: 1-D array (NaN = undefined)."""
    v = np.asarray(values, dtype=F64).ravel()
    defined = v[~np.isnan(v)]
    out = {"count": int(defined.size), "undefined": int(v.size - defined.size)}
    for s in STATS:
        if defined.size == 0:
            x = None
        elif s == "mean":
            x = float(np.mean(defined))
        elif s == "min":
            x = float(np.min(defined))
        elif s == "max":
            x = float(np.max(defined))
        else:
            x = float(np.percentile(defined, float(s[1:])))
        out[s] = None if x is None or not math.isfinite(x) else x
    return out


def mean_or_none(values):
    v = np.asarray(values, dtype=F64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return None
    x = float(np.mean(v))
    return x if math.isfinite(x) else None


def topk_recall_interval(p, sel, m):
    """p: float64 dense p over s <= t; sel: the selection S_t (positions); m = min(k, t+1).
    Returns (low, high, ambiguous): the oracle's overlap with S_t / m, as an interval where p's
    m-th and (m+1)-th largest values are within TIE_BAND."""
    n = p.size
    in_sel = np.zeros(n, dtype=bool)
    in_sel[sel] = True
    if m >= n:
        r = float(np.count_nonzero(in_sel)) / m
        return r, r, False
    order = np.argsort(-p, kind="stable")          # descending, equal values lower position first
    exact = float(np.count_nonzero(in_sel[order[:m]])) / m
    vk, vk1 = p[order[m - 1]], p[order[m]]
    if vk - vk1 > TIE_BAND * vk:
        return exact, exact, False
    c = 0.5 * (vk + vk1)
    eps = TIE_BAND * c
    sure = p > c + eps
    band = np.abs(p - c) <= eps
    need = m - int(np.count_nonzero(sure))
    base = int(np.count_nonzero(sure & in_sel))
    zs = int(np.count_nonzero(band & in_sel))
    zn = int(np.count_nonzero(band & ~in_sel))
    lo = base + max(0, need - zn)
    hi = base + min(need, zs)
    return lo / m, hi / m, lo != hi


class Case:
    """Inputs as float64 arrays with a batch axis: q [B,Lq,H,d], keys [B,Lk,Hkv,d],
    values [B,Lk,Hkv,dv]."""

    def __init__(self, q, keys, values, scale):
        self.q, self.keys, self.values, self.scale = q, keys, values, scale
        self.B, self.Lq, self.H, self.dqk = q.shape
        self.Lk, self.Hkv = keys.shape[1], keys.shape[2]
        self.dv = values.shape[3]
        self.head_map = np.arange(self.H) // (self.H // self.Hkv)
        self._dense = {}

    def dense(self, b, r):
        """(P [H, t+1] float64, logits [H, t+1], o_dense [H, dv])."""
        key = (b, r)
        if key not in self._dense:
            t = self.Lk - self.Lq + r
            kk = self.keys[b, :t + 1][:, self.head_map, :]          # [t+1, H, d]
            vv = self.values[b, :t + 1][:, self.head_map, :]        # [t+1, H, dv]
            logits = self.scale * np.einsum("hd,shd->hs", self.q[b, r], kk)
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            P = e / e.sum(axis=1, keepdims=True)
            o = np.einsum("hs,shd->hd", P, vv)
            self._dense[key] = (P, logits, o, vv)
        return self._dense[key]


def log_softmax(x):
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


def reference_entry(case, k, selections, scores, needles, perturb=None):
    """One results entry. selections[b][r] -> array of selected positions (S_t at this k).
    scores: float64 [B, Lq, Lk] or None (--indices mode). Returns (entry, per-row arrays, ties)."""
    B, Lq, Lk, H = case.B, case.Lq, case.Lk, case.H
    rows = B * Lq
    per = {m: np.full((rows, H) if m in ("out_rel_err", "out_cosine", "mass_recall_head") else rows, np.nan)
           for m in ROW_METRICS}
    topk_lo = np.full(rows, np.nan)
    topk_hi = np.full(rows, np.nan)
    tpos = np.zeros(rows, dtype=np.int64)
    num_sp = den_sp = num_all = den_all = 0.0
    n_attended = 0
    ties = []
    i = 0
    for b in range(B):
        for r in range(Lq):
            t = Lk - Lq + r
            tpos[i] = t
            P, logits, od, vv = case.dense(b, r)
            sel = np.asarray(selections[b][r], dtype=np.int64)
            n_attended += sel.size
            # sparse attention over S_t
            ls = logits[:, sel]
            e = np.exp(ls - ls.max(axis=1, keepdims=True))
            Ps = e / e.sum(axis=1, keepdims=True)
            osp = np.einsum("hs,shd->hd", Ps, vv[sel])
            diff = np.linalg.norm(osp - od, axis=1)
            nd = np.linalg.norm(od, axis=1)
            ns = np.linalg.norm(osp, axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(nd > 0, diff / nd, np.where(diff > 0, np.inf, 0.0))
                cos = np.where((nd > 0) & (ns > 0), np.sum(osp * od, axis=1) / (nd * ns),
                               np.where((nd == 0) & (ns == 0), 1.0, 0.0))
            per["out_rel_err"][i] = rel
            per["out_cosine"][i] = cos
            per["mass_recall_head"][i] = P[:, sel].sum(axis=1)
            p = P.mean(axis=0)
            per["mass_recall"][i] = p[sel].sum()
            m = min(k, t + 1)
            lo, hi, amb = topk_recall_interval(p, sel, m)
            topk_lo[i], topk_hi[i] = lo, hi
            if amb:
                ties.append((b, t, lo, hi))
            sq_d, sq_n = float(np.sum(diff ** 2)), float(np.sum(nd ** 2))
            num_all += sq_d
            den_all += sq_n
            if t + 1 > k:
                num_sp += sq_d
                den_sp += sq_n
            if scores is not None:
                I = scores[b, r, :t + 1]
                pos = p > 0
                kd = float(np.sum(p[pos] * (np.log(p[pos]) - log_softmax(I)[pos])))
                per["kl_dense"][i] = max(kd, 0.0)
                mass = p[sel].sum()
                if mass > 0:
                    ps = p[sel] / mass
                    lq = log_softmax(I[sel])
                    pos = ps > 0
                    per["kl_sparse"][i] = max(float(np.sum(ps[pos] * (np.log(ps[pos]) - lq[pos]))), 0.0)
            i += 1
    per["topk_recall"] = topk_lo
    if perturb is not None:
        perturb(per, topk_lo, topk_hi)
    sparse_rows = tpos + 1 > k
    entry = {"topk": k, "rows": {"sparse": int(np.count_nonzero(sparse_rows)),
                              "exact": int(np.count_nonzero(~sparse_rows))}}
    for mname in ROW_METRICS:
        if scores is None and mname in ("kl_dense", "kl_sparse"):
            entry[mname] = None
            continue
        entry[mname] = {}
        for kind, mask in (("sparse", sparse_rows), ("exact", ~sparse_rows)):
            if mname == "topk_recall":
                entry[mname][kind] = (summary(topk_lo[mask]), summary(topk_hi[mask]))
            else:
                entry[mname][kind] = summary(per[mname][mask])
    entry["out_rel_err_global"] = {
        "sparse": math.sqrt(num_sp / den_sp) if den_sp > 0 else None,
        "all": math.sqrt(num_all / den_all) if den_all > 0 else None}
    # needles: each (t, s) once per batch element
    if needles is None or needles.shape[0] == 0:
        entry["needle_recall"] = {"needles": 0, "selected": 0, "recall": None}
    else:
        sel_count = 0
        for b in range(B):
            for t, s in needles:
                r = int(t) - (Lk - Lq)
                if int(s) in set(int(x) for x in selections[b][r]):
                    sel_count += 1
        nn = needles.shape[0] * B
        entry["needle_recall"] = {"needles": nn, "selected": sel_count, "recall": sel_count / nn}
    entry["sparse_attention_flops"] = 2.0 * n_attended * H * (case.dqk + case.dv)
    # buckets [0,k), [k,2k), [2k,4k), ... cut at Lk
    buckets = []
    edges = [0, k]
    while edges[-1] < Lk:
        edges.append(edges[-1] * 2)
    for begin, end in zip(edges[:-1], edges[1:]):
        end = min(end, Lk)
        if begin >= end:
            break
        mask = (tpos >= begin) & (tpos < end)
        if not np.any(mask):
            continue
        bk = {"begin": begin, "end": end, "rows": int(np.count_nonzero(mask))}
        for mname in BUCKET_METRICS:
            if mname == "topk_recall":
                bk[mname] = (mean_or_none(topk_lo[mask]), mean_or_none(topk_hi[mask]))
            elif scores is None and mname in ("kl_dense", "kl_sparse"):
                bk[mname] = None
            else:
                bk[mname] = mean_or_none(per[mname][mask])
        buckets.append(bk)
    entry["buckets"] = buckets
    return entry, ties


# ------------------------------------------------------------------------------------------
# Comparison

class Comparer:
    def __init__(self):
        self.mismatches = []
        self.worst = {}   # metric -> (abs diff, rel diff, where)

    def value(self, metric, where, got, ref):
        """ref: number, None, or (low, high) interval."""
        if isinstance(ref, tuple):
            lo, hi = ref
        else:
            lo = hi = ref
        if lo is None or hi is None:
            if got is not None or lo is not hi:
                self.mismatches.append(f"{where}: got {got}, expected {ref}")
            return
        if got is None:
            self.mismatches.append(f"{where}: got null, expected {ref}")
            return
        atol, rtol = TOL[metric]
        scale = max(abs(lo), abs(hi))
        d = 0.0 if lo <= got <= hi else min(abs(got - lo), abs(got - hi))
        rel = d / scale if scale > 0 else (0.0 if d == 0 else math.inf)
        prev = self.worst.get(metric)
        if prev is None or d > prev[0]:
            self.worst[metric] = (d, rel, where)
        if d > atol + rtol * scale:
            self.mismatches.append(f"{where}: got {got!r}, expected {ref!r} (diff {d:.3g})")

    def exact(self, where, got, ref):
        if got != ref:
            self.mismatches.append(f"{where}: got {got!r}, expected {ref!r}")

    def summary(self, metric, where, got, ref):
        if got is None or ref is None:
            self.exact(where, got, ref)
            return
        refs = ref if isinstance(ref, tuple) else (ref, ref)
        for key in ("count", "undefined"):
            self.exact(f"{where}.{key}", got.get(key), refs[0][key])
        for s in STATS:
            lo, hi = refs[0][s], refs[1][s]
            self.value(metric, f"{where}.{s}", got.get(s), (lo, hi) if lo is not None and hi is not None else
                       (None if lo is None and hi is None else (lo, hi)))

    def entry(self, where, got, ref):
        self.exact(f"{where}.topk", got.get("topk"), ref["topk"])
        self.exact(f"{where}.rows", got.get("rows"), ref["rows"])
        for m in ROW_METRICS:
            if ref[m] is None:
                self.exact(f"{where}.{m}", got.get(m), None)
                continue
            if got.get(m) is None:
                self.mismatches.append(f"{where}.{m}: got null")
                continue
            for kind in ("sparse", "exact"):
                self.summary(m, f"{where}.{m}.{kind}", got[m].get(kind), ref[m][kind])
        for kind in ("sparse", "all"):
            self.value("out_rel_err_global", f"{where}.out_rel_err_global.{kind}",
                       got["out_rel_err_global"].get(kind), ref["out_rel_err_global"][kind])
        g, r = got["needle_recall"], ref["needle_recall"]
        self.exact(f"{where}.needle_recall.needles", g.get("needles"), r["needles"])
        self.exact(f"{where}.needle_recall.selected", g.get("selected"), r["selected"])
        self.value("needle_recall", f"{where}.needle_recall.recall", g.get("recall"), r["recall"])
        self.value("flops", f"{where}.sparse_attention_flops", got.get("sparse_attention_flops"),
                   ref["sparse_attention_flops"])
        gb, rb = got.get("buckets", []), ref["buckets"]
        self.exact(f"{where}.buckets[*].(begin,end,rows)", [(x.get("begin"), x.get("end"), x.get("rows")) for x in gb],
                   [(x["begin"], x["end"], x["rows"]) for x in rb])
        for x, y in zip(gb, rb):
            for m in BUCKET_METRICS:
                self.value(m, f"{where}.buckets[{y['begin']},{y['end']}).{m}", x.get(m), y[m])


# ------------------------------------------------------------------------------------------
# Cases

class Runner:
    def __init__(self, bindir, tmp):
        self.bindir = bindir
        self.tmp = tmp
        self.worst = {}   # metric -> (abs diff, rel diff, where)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def merge_worst(self, comp, tag):
        for m, (d, rel, where) in comp.worst.items():
            prev = self.worst.get(m)
            if prev is None or d > prev[0]:
                self.worst[m] = (d, rel, f"{tag} {where}")

    def run_case(self, name, case, att_args, idx_args, idx_opts, ks, needles=None, needle_arg=None,
                 flops_v=None, self_test=False):
        """att_args: dsa-compare attention arguments; idx_args: --q-index/--k-index/--weights;
        idx_opts: indexer options (passed to dsa-score, dsa-select and dsa-compare)."""
        tag = (f"{name} [B={case.B} Lq={case.Lq} Lk={case.Lk} H={case.H} H_kv={case.Hkv} d_qk={case.dqk} "
               f"d_v={case.dv} k={','.join(map(str, ks))}{' ' + ' '.join(idx_opts) if idx_opts else ''}]")
        kmax = ks[-1]
        s_path, i_path = self.path(f"{name}_S.npy"), self.path(f"{name}_I.npy")
        try:
            run_tool(self.bindir, "dsa-score", idx_args + idx_opts + ["-o", s_path])
            run_tool(self.bindir, "dsa-select", idx_args + idx_opts + ["-k", kmax, "-o", i_path])
        except RunFailure as e:
            CHECKS.record(f"dsa-score/dsa-select {tag}", False, str(e))
            return
        S = np.load(s_path)
        I = np.load(i_path)
        batched = S.ndim == 3
        if not batched:
            S, I = S[None], I[None]
        if S.dtype != F32 or S.shape != (case.B, case.Lq, case.Lk) or I.shape != (case.B, case.Lq, kmax):
            CHECKS.record(f"dsa-score/dsa-select outputs {tag}", False, f"S {S.dtype} {S.shape}, I {I.shape}")
            return
        scores = S.astype(F64)
        rows_sel = [[I[b, r][I[b, r] >= 0] for r in range(case.Lq)] for b in range(case.B)]
        # sanity: the selection is what the man page says (distinct, visible, min(k, t+1) of them)
        bad = 0
        for b in range(case.B):
            for r in range(case.Lq):
                t = case.Lk - case.Lq + r
                sel = rows_sel[b][r]
                if sel.size != min(kmax, t + 1) or np.unique(sel).size != sel.size or sel.max() > t:
                    bad += 1
        CHECKS.record(f"selection well-formed {tag}", bad == 0, f"{bad} bad rows" if bad else "")

        nd_arg = ["--needles", needle_arg] if needle_arg else []
        sweep = ["-k", kmax] if len(ks) == 1 else ["--sweep-topk", ",".join(map(str, ks))]
        refs_idx, refs_ind = {}, {}
        ties_note = {}
        for k in ks:
            sel_k = [[rows_sel[b][r][:min(k, case.Lk - case.Lq + r + 1)] for r in range(case.Lq)]
                     for b in range(case.B)]
            refs_idx[k], ties = reference_entry(case, k, sel_k, scores, needles)
            refs_ind[k], _ = reference_entry(case, k, sel_k, None, needles)
            ties_note[k] = ties

        def compare(mode, report_path, ks_here, refs):
            with open(report_path) as f:
                rep = json.load(f)
            comp = Comparer()
            comp.exact("selection", rep.get("selection"), mode)
            comp.exact("shape", rep.get("shape", {}).get("batch"), case.B)
            comp.exact("results[*].topk", [e.get("topk") for e in rep.get("results", [])], ks_here)
            for e, k in zip(rep.get("results", []), ks_here):
                comp.entry(f"results[k={k}]", e, refs[k])
            if flops_v is not None:
                comp.value("flops", "flops.dense_attention", rep["flops"]["dense_attention"], flops_v[0])
                comp.value("flops", "flops.indexer", rep["flops"]["indexer"], flops_v[1] if mode == "indexer" else 0.0)
            return rep, comp

        def report(check_name, comp, extra=""):
            self.merge_worst(comp, check_name)
            detail = extra
            if comp.mismatches:
                detail = f"{len(comp.mismatches)} mismatches: " + "; ".join(comp.mismatches[:8])
            CHECKS.record(check_name, not comp.mismatches, detail)

        # indexer mode
        rep_path = self.path(f"{name}_cmp_indexer.json")
        try:
            run_tool(self.bindir, "dsa-compare", att_args + idx_args + idx_opts + sweep + nd_arg + ["-o", rep_path],
                     quiet=False)
        except RunFailure as e:
            CHECKS.record(f"dsa-compare indexer {tag}", False, str(e))
            return
        _, comp = compare("indexer", rep_path, ks, refs_idx)
        nties = {k: len(v) for k, v in ties_note.items() if v}
        for k, v in ties_note.items():
            for (b, t, lo, hi) in v:
                print(f"      note: {name} k={k} b={b} t={t}: p near-tie at the k-th place, topk_recall in [{lo:.4f}, {hi:.4f}]")
            if len(v) > MAX_TIE_ROWS:
                comp.mismatches.append(f"k={k}: {len(v)} rows with near-ties in p (at most {MAX_TIE_ROWS} allowed)")
        report(f"dsa-compare indexer {tag}", comp, f"near-tie rows {nties}" if nties else "")

        if self_test:
            self.self_test(name, case, ks, rows_sel, scores, needles, rep_path, refs_idx, compare)

        # --indices mode: the selection file at kmax, and its prefixes for the smaller k
        for k in ks:
            ip = i_path
            if k != kmax:
                ip = self.path(f"{name}_I{k}.npy")
                sub = np.ascontiguousarray(I[:, :, :k])
                np.save(ip, sub if batched else sub[0])
            rp = self.path(f"{name}_cmp_indices{k}.json")
            try:
                run_tool(self.bindir, "dsa-compare", att_args + ["--indices", ip] + nd_arg + ["-o", rp], quiet=False)
            except RunFailure as e:
                CHECKS.record(f"dsa-compare --indices {tag} k={k}", False, str(e))
                continue
            _, comp = compare("indices", rp, [k], refs_ind)
            report(f"dsa-compare --indices (width {k}{', prefix' if k != kmax else ''}) {tag}", comp)

    def self_test(self, name, case, ks, rows_sel, scores, needles, rep_path, refs_idx, compare):
        """Perturbs one NumPy value at a time (of the last row, a sparse one) and requires the
        comparison to flag it. The perturbations are large enough to move a mean over a few
        hundred rows (or row-head pairs) past the tolerance; a tiny one would rightly pass."""
        k = ks[0]
        sel_k = [[rows_sel[b][r][:min(k, case.Lk - case.Lq + r + 1)] for r in range(case.Lq)]
                 for b in range(case.B)]
        last = case.B * case.Lq - 1   # the last row is sparse when Lk > k

        def bump(metric, delta, head=None):
            def f(per, lo, hi):
                if metric == "topk_recall":
                    lo[last] += delta
                    hi[last] += delta
                elif head is None:
                    per[metric][last] += delta
                else:
                    per[metric][last, head] += delta
            return f

        perturbations = [
            ("mass_recall +0.1 on one row", bump("mass_recall", 0.1), None),
            ("mass_recall_head +0.1 on one (row, head)", bump("mass_recall_head", 0.1, 0), None),
            ("out_rel_err x1.5 on one (row, head)", None, "rel"),
            ("out_cosine -0.1 on one (row, head)", bump("out_cosine", -0.1, 0), None),
            ("topk_recall +1/k on one row", bump("topk_recall", 1.0 / k), None),
            ("kl_dense x1.5 on one row", None, "kld"),
            ("kl_sparse x1.5 on one row", None, "kls"),
            ("needle count +1", None, "needle"),
            ("row split off by one", None, "rows"),
        ]
        for label, fn, special in perturbations:
            if special == "rel":
                def fn(per, lo, hi):
                    per["out_rel_err"][last, 0] *= 1.5
            elif special == "kld":
                def fn(per, lo, hi):
                    per["kl_dense"][last] *= 1.5
            elif special == "kls":
                def fn(per, lo, hi):
                    per["kl_sparse"][last] *= 1.5
            refs = dict(refs_idx)
            ref, _ = reference_entry(case, k, sel_k, scores, needles, perturb=fn)
            if special == "needle":
                ref = copy.deepcopy(refs_idx[k])
                ref["needle_recall"]["selected"] += 1
            elif special == "rows":
                ref = copy.deepcopy(refs_idx[k])
                ref["rows"]["sparse"] += 1
                ref["rows"]["exact"] -= 1
            refs[k] = ref
            _, comp = compare("indexer", rep_path, ks, refs)
            CHECKS.record(f"self-test {name}: perturbed {label} is reported", bool(comp.mismatches),
                          f"{len(comp.mismatches)} mismatches, first: {comp.mismatches[0]}" if comp.mismatches
                          else "NOT DETECTED")


def rand_case(runner, name, seed, batch, lq, lk, heads, dqk, dv, hkv, hi_, di, ks, qscale=2.0,
              idx_opts=(), needles=None, self_test=False):
    """hkv None: MQA --kv/--dv. Writes f32 .npy inputs (batched when batch is not None)."""
    rng = np.random.default_rng(seed)
    nb = batch or 1
    q = (qscale * rng.standard_normal((nb, lq, heads, dqk))).astype(F32)
    qi = rng.standard_normal((nb, lq, hi_, di)).astype(F32)
    ki = rng.standard_normal((nb, lk, di)).astype(F32)
    w = rng.uniform(0.2, 1.0, (nb, lq, hi_)).astype(F32)
    p = runner.path

    def save(fname, x):
        np.save(p(fname), x if batch else x[0])
        return p(fname)

    args = ["--q", save(f"{name}_q.npy", q)]
    if hkv is None:
        kv = rng.standard_normal((nb, lk, dqk)).astype(F32)
        args += ["--kv", save(f"{name}_kv.npy", kv), "--dv", dv]
        keys, values = kv[:, :, None, :], kv[:, :, None, :dv]
    else:
        kk = rng.standard_normal((nb, lk, hkv, dqk)).astype(F32)
        vv = rng.standard_normal((nb, lk, hkv, dv)).astype(F32)
        args += ["--k", save(f"{name}_k.npy", kk), "--v", save(f"{name}_v.npy", vv)]
        keys, values = kk, vv
    idx_args = ["--q-index", save(f"{name}_qi.npy", qi), "--k-index", save(f"{name}_ki.npy", ki),
                "--weights", save(f"{name}_w.npy", w)]
    case = Case(q.astype(F64), keys.astype(F64), values.astype(F64), float(F32(dqk ** -0.5)))
    needle_arg = None
    if needles is not None:
        needles = np.asarray(needles, dtype=np.int32)
        needle_arg = p(f"{name}_needles.npy")
        np.save(needle_arg, needles)
    v_sum = sum(lk - lq + r + 1 for r in range(lq)) * nb
    flops_v = (2.0 * v_sum * heads * (dqk + dv), 2.0 * v_sum * hi_ * di)
    runner.run_case(name, case, args, idx_args, list(idx_opts), ks, needles, needle_arg, flops_v, self_test)


def gen_case(runner, name, ks, dv):
    st = runner.path(f"{name}.safetensors")
    run_tool(runner.bindir, "dsa-gen", ["--length", 400, "--needles", 6, "--seed", 5, "-o", st])
    t = read_safetensors(st)
    q, kv = t["q"].astype(F64)[None], t["kv"].astype(F64)[None]
    lk, heads, dqk = kv.shape[1], q.shape[2], q.shape[3]
    hi_, di = t["q_index"].shape[1], t["q_index"].shape[2]
    case = Case(q, kv[:, :, None, :], kv[:, :, None, :dv], float(F32(dqk ** -0.5)))
    args = ["--q", f"{st}:q", "--kv", f"{st}:kv", "--dv", dv]
    idx_args = ["--q-index", f"{st}:q_index", "--k-index", f"{st}:k_index", "--weights", f"{st}:weights"]
    v_sum = lk * (lk + 1) // 2
    flops_v = (2.0 * v_sum * heads * (dqk + dv), 2.0 * v_sum * hi_ * di)
    runner.run_case(name, case, args, idx_args, [], ks, t["needles"].astype(np.int64), f"{st}:needles", flops_v)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", required=True, help="directory holding dsa-compare, dsa-score, dsa-select, dsa-gen")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--self-test", action="store_true",
                        help="also require deliberately perturbed NumPy values to be reported as mismatches")
    args = parser.parse_args()
    bindir = os.path.abspath(args.bin)
    for tool in ("dsa-compare", "dsa-score", "dsa-select", "dsa-gen"):
        if not os.access(os.path.join(bindir, tool), os.X_OK):
            print(f"numpy_compare_check: {tool} not found (or not executable) in {bindir}")
            return 1

    tmp = tempfile.mkdtemp(prefix="dsa-numpy-compare-check-")
    try:
        r = Runner(bindir, tmp)
        try:
            # MQA latent layout, prefill, sweep (k = 100 gives buckets [0,100), [100,200))
            rand_case(r, "mqa-prefill", 21, None, 200, 200, 4, 32, 16, None, 4, 16, [8, 32, 100],
                      needles=[[150, 3], [199, 198], [40, 0], [120, 77]], self_test=args.self_test)
            # MHA, prefill, single k, fp8 + Hadamard indexer arithmetic passed through
            rand_case(r, "mha-prefill-fp8", 22, None, 150, 150, 4, 24, 24, 4, 4, 32, [20],
                      idx_opts=("--precision", "fp8", "--hadamard"))
            # GQA with a batch dimension, decode Lq < Lk, needles checked in every batch element
            rand_case(r, "gqa-batched-decode", 23, 2, 40, 260, 8, 64, 48, 2, 3, 16, [16, 64],
                      needles=[[259, 0], [230, 229], [221, 100]], self_test=args.self_test)
            # MQA decode, bf16 indexer, k between buckets
            rand_case(r, "mqa-decode-bf16", 24, None, 50, 300, 2, 16, 16, None, 2, 16, [4, 48, 96],
                      idx_opts=("--precision", "bf16"))
            # every row exact: k >= L, sparse summaries empty, out_rel_err_global.sparse null
            rand_case(r, "all-exact", 25, None, 60, 60, 3, 16, 8, 3, 2, 8, [64])
            # the dsa-gen workload with its needles
            gen_case(r, "gen400", [16, 64, 256], 48)
        except RunFailure as e:
            CHECKS.record("tool run", False, str(e))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print("worst observed differences (absolute, relative; outside the topk_recall tie interval):")
    for metric, (d, rel, where) in sorted(r.worst.items()):
        print(f"  {metric}: {d:.3g} abs, {rel:.3g} rel  ({where})")
    return CHECKS.finish()


if __name__ == "__main__":
    sys.exit(main())
