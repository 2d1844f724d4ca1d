#!/usr/bin/env python3
"""The toolkit's bf16 and float8 e4m3fn rounding against PyTorch's own (issue 12).

Builds a set of f32 values that covers every rounding case of both formats: for bf16 every one
of the 2^16 upper halves with lower halves 0, 1, 0x7fff, 0x8000, 0x8001, 0xffff and a random
one (every exponent, subnormals, infinities and NaN, every halfway point); for e4m3 every f32
exponent from 2^-12 to 2^9 with every top-11-bit mantissa and low bits 0, 1, 0x7ff, 0x800,
0x801, 0xfff, both signs (every code, every halfway point, the subnormals, saturation). Converts
them with torch on the CPU and, where there is one, the GPU: x.to(torch.bfloat16), and
x.clamp(-448, 448).to(torch.float8_e4m3fn) as the released act_quant does. Then runs
test_precision's TorchRounding test, which compares them with dsa's f32_to_bf16 and f32_to_e4m3.

Usage: python3 tests/torch_rounding_check.py --test-precision build/tests/test_precision
Exit status: 0 identical, 1 a difference, 77 torch (or numpy, or torch's e4m3) is missing.
"""
import argparse
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
    import torch
except ImportError as missing:
    print(f"torch_rounding_check: {missing.name} is not available; skipping", file=sys.stderr)
    sys.exit(77)
if not hasattr(torch, "float8_e4m3fn"):  # e4m3 came with torch 2.1; Debian 12 ships 1.13
    print(f"torch_rounding_check: torch {torch.__version__} has no float8_e4m3fn; skipping",
          file=sys.stderr)
    sys.exit(77)


def values():
    rng = np.random.default_rng(12)
    high = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lows = [0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF]
    bf16_cases = [high | np.uint32(low) for low in lows]
    bf16_cases.append(high | rng.integers(0, 1 << 16, high.size, dtype=np.uint32))
    exponents = np.arange(127 - 12, 127 + 10, dtype=np.uint32)
    top = np.arange(1 << 11, dtype=np.uint32) << np.uint32(12)
    grid = (exponents[:, None] << np.uint32(23)) | top[None, :]
    e4m3_cases = []
    for low in [0, 1, 0x7FF, 0x800, 0x801, 0xFFF]:
        bits = (grid | np.uint32(low)).ravel()
        e4m3_cases += [bits, bits | np.uint32(0x80000000)]
    bits = np.concatenate(bf16_cases + e4m3_cases)
    return bits.view(np.float32)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--test-precision", required=True, help="the test_precision binary")
    args = parser.parse_args()
    x = values()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as folder:
        np.save(os.path.join(folder, "x.npy"), x)
        for device in devices:
            t = torch.from_numpy(x).to(device)
            bf16 = t.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
            e4m3 = t.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
            np.save(os.path.join(folder, f"bf16_{device}.npy"), bf16.cpu().numpy())
            np.save(os.path.join(folder, f"e4m3_{device}.npy"), e4m3.cpu().numpy())
        print(f"torch_rounding_check: torch {torch.__version__}, {x.size} values on "
              f"{', '.join(devices)}", flush=True)
        env = dict(os.environ, DSA_TORCH_ROUNDING=folder)
        run = subprocess.run([args.test_precision, "--gtest_filter=TorchRounding.*"], env=env)
        return 0 if run.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
