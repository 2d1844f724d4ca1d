"""How arrays cross into the library and back: no copies where the layout allows (C-contiguous
NumPy arrays, DLPack on the CPU), one NumPy conversion otherwise, clear errors for dtypes and
devices the library does not take, outputs as NumPy arrays over the library's buffers."""
import ctypes
import gc
import sys
import unittest

import numpy as np

from refs import F32, bf16, bf16_bits, import_dsa, indexer_inputs, rng

dsa = import_dsa()


class DLPackOnly:
    """An object offering only DLPack (no __array__), as many array libraries do."""

    def __init__(self, array, device=(1, 0)):
        self.array = array
        self.device = device

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, stream=None):
        return self.array.__dlpack__()


class ArrayOnly:
    """An object offering only __array__."""

    def __init__(self, array):
        self.array = array

    def __array__(self, dtype=None):
        return self.array


# A DLPack capsule made by hand (dlpack.h's structs through ctypes): bfloat16, which NumPy cannot
# export, and any device type.
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class HandMadeDLPack:
    """uint16 storage exported as DLPack dtype (code, bits), e.g. bfloat16 = (4, 16); strides in
    elements or None. Keeps every struct alive; the deleter is NULL (allowed by dlpack.h)."""

    def __init__(self, storage, code, bits, strides=None, device_type=1):
        self.storage = storage
        self.shape = (ctypes.c_int64 * storage.ndim)(*storage.shape)
        self.strides = None if strides is None else (ctypes.c_int64 * storage.ndim)(*strides)
        self.managed = _DLManagedTensor()
        t = self.managed.dl_tensor
        t.data = storage.ctypes.data
        t.device = _DLDevice(device_type, 0)
        t.ndim = storage.ndim
        t.dtype = _DLDataType(code, bits, 1)
        t.shape = self.shape
        t.strides = self.strides
        t.byte_offset = 0
        self.device_type = device_type

    def __dlpack_device__(self):
        return (1, 0)  # lies for device_type != 1: the capsule's own device must be checked too

    def __dlpack__(self, stream=None):
        return _capsule_new(ctypes.addressof(self.managed), b"dltensor", None)


class ZeroCopyIn(unittest.TestCase):
    def test_contiguous_arrays_of_every_taken_dtype_are_viewed(self):
        g = rng(1)
        for dtype, name in [(np.float32, "f32"), (np.float64, "f64"), (np.float16, "f16"),
                            (np.int32, "i32"), (np.int64, "i64"), (np.uint8, "u8")]:
            a = (g.standard_normal((3, 5)) * 10).astype(dtype)
            info = dsa._tensor_info(a)
            self.assertEqual(info["data"], a.ctypes.data, name)
            self.assertFalse(info["copied"], name)
            self.assertEqual(info["dtype"], name)
            self.assertEqual(info["shape"], [3, 5])

    def test_views_that_are_contiguous_are_not_copied(self):
        a = np.arange(60, dtype=F32).reshape(4, 15)
        row = a[1:3]  # C-contiguous slice of rows
        info = dsa._tensor_info(row)
        self.assertEqual(info["data"], row.ctypes.data)
        self.assertFalse(info["copied"])
        readonly = np.frombuffer(a.tobytes(), dtype=F32).reshape(4, 15)
        self.assertFalse(dsa._tensor_info(readonly)["copied"])

    def test_other_layouts_are_copied_once(self):
        a = np.arange(60, dtype=F32).reshape(4, 15)
        for name, view in [("transposed", a.T), ("strided", a[:, ::2]),
                           ("fortran", np.asfortranarray(a)),
                           ("big-endian", a.astype(">f4"))]:
            info = dsa._tensor_info(view)
            self.assertTrue(info["copied"], name)
            self.assertNotEqual(info["data"], view.ctypes.data, name)

    def test_copies_compute_the_same(self):
        g = rng(2)
        q, k, w = indexer_inputs(g, 12, 12)
        expected = dsa.score(q, k, w)
        got = dsa.score(np.asfortranarray(q), k.astype(">f4"), w.T.copy().T)
        np.testing.assert_array_equal(got, expected)

    def test_array_likes_and_lists(self):
        a = np.arange(12, dtype=F32).reshape(3, 4)
        info = dsa._tensor_info(ArrayOnly(a))
        self.assertEqual(info["data"], a.ctypes.data)
        self.assertEqual(dsa._tensor_info([[1.0, 2.0]])["dtype"], "f64")
        self.assertEqual(dsa._tensor_info([[1, 2]])["dtype"], "i64")

    def test_dlpack_is_viewed(self):
        a = np.arange(24, dtype=F32).reshape(2, 3, 4)
        info = dsa._tensor_info(DLPackOnly(a))
        self.assertEqual(info["data"], a.ctypes.data)
        self.assertFalse(info["copied"])
        self.assertEqual(info["shape"], [2, 3, 4])

    def test_strided_dlpack_is_copied(self):
        a = np.arange(24, dtype=F32).reshape(4, 6)[:, ::2]
        info = dsa._tensor_info(DLPackOnly(a))
        self.assertTrue(info["copied"])
        self.assertEqual(info["shape"], [4, 3])

    def test_bfloat16_through_dlpack(self):
        g = rng(3)
        q, k, w = indexer_inputs(g, 10, 10)
        bits = bf16_bits(q)
        info = dsa._tensor_info(HandMadeDLPack(bits, 4, 16))
        self.assertEqual(info["dtype"], "bf16")
        self.assertEqual(info["data"], bits.ctypes.data)
        got = dsa.score(HandMadeDLPack(bits, 4, 16), k, w)
        np.testing.assert_array_equal(got, dsa.score(bf16(q), k, w))
        transposed = bits.reshape(10, -1).T.copy()  # a strided bfloat16 view of it
        with self.assertRaises(dsa.BadInputError) as caught:
            dsa._tensor_info(HandMadeDLPack(transposed, 4, 16, strides=(1, transposed.shape[0])))
        self.assertIn(".contiguous()", str(caught.exception))

    def test_ml_dtypes_bfloat16(self):
        try:
            import ml_dtypes
        except ImportError:
            self.skipTest("ml_dtypes is not installed")
        a = np.ones((2, 3), dtype=ml_dtypes.bfloat16)
        info = dsa._tensor_info(a)
        self.assertEqual(info["dtype"], "bf16")
        self.assertEqual(info["data"], a.ctypes.data)


class RefusedIn(unittest.TestCase):
    def test_unsupported_dtypes(self):
        for dtype in [np.int16, np.uint32, np.complex64, np.bool_]:
            with self.assertRaises(dsa.BadInputError) as caught:
                dsa._tensor_info(np.zeros(3, dtype=dtype), "q")
            self.assertEqual(caught.exception.exit_code, 3)
            self.assertTrue(str(caught.exception).startswith("q: unsupported dtype"))
        with self.assertRaises(dsa.BadInputError):
            dsa._tensor_info(HandMadeDLPack(np.zeros(3, dtype=np.uint16), 1, 16))

    def test_gpu_tensors_are_refused_before_their_capsule(self):
        with self.assertRaises(dsa.BadInputError) as caught:
            dsa._tensor_info(DLPackOnly(np.zeros(3, dtype=F32), device=(2, 1)), "kv")
        message = str(caught.exception)
        self.assertIn("kv: a tensor on cuda:1", message)
        self.assertIn("kv.cpu()", message)
        with self.assertRaises(dsa.BadInputError) as caught:  # the capsule's own device
            dsa._tensor_info(HandMadeDLPack(np.zeros(3, dtype=np.uint16), 4, 16, device_type=2))
        self.assertIn("cuda:0", str(caught.exception))

    def test_floating_inputs_expected(self):
        g = rng(4)
        q, k, w = indexer_inputs(g, 6, 6)
        with self.assertRaises(dsa.BadInputError) as caught:
            dsa.score(q.astype(np.int32), k, w)
        self.assertIn("q_index", str(caught.exception))


class ZeroCopyOut(unittest.TestCase):
    def test_outputs_view_the_library_buffer(self):
        g = rng(5)
        q, k, w = indexer_inputs(g, 8, 8)
        scores = dsa.score(q, k, w)
        self.assertFalse(scores.flags.owndata)
        self.assertTrue(scores.flags.c_contiguous)
        self.assertTrue(scores.flags.writeable)
        self.assertEqual(type(scores.base).__name__, "PyCapsule")
        # what the library wrote is what the array shows, and the next call's buffer is another
        self.assertEqual(dsa._tensor_info(scores)["data"], scores.ctypes.data)
        again = dsa.score(q, k, w)
        self.assertFalse(np.shares_memory(scores, again))
        indices, selected = dsa.select(q, k, w, topk=4)
        self.assertFalse(np.shares_memory(indices, selected))
        self.assertEqual(indices.dtype, np.int32)
        self.assertEqual(selected.dtype, np.float32)

    def test_outputs_outlive_everything_else(self):
        g = rng(6)
        q, k, w = indexer_inputs(g, 8, 8)
        expected = dsa.score(q, k, w).copy()
        out = dsa.score(q.copy(), k.copy(), w.copy())
        view = out[2:]
        del out, q, k, w
        gc.collect()
        np.testing.assert_array_equal(view, expected[2:])

    def test_inputs_are_released(self):
        a = np.ones((4, 4), dtype=F32)
        before = sys.getrefcount(a)
        for _ in range(10):
            dsa._tensor_info(a)
            dsa._tensor_info(DLPackOnly(a))
        gc.collect()
        self.assertEqual(sys.getrefcount(a), before)


if __name__ == "__main__":
    unittest.main()
