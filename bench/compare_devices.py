#!/usr/bin/env python3
"""Side by side: two dsa-compare reports of the same inputs (say --device cpu and --device
cuda), each k's sparse-row means, needle recall, global errors and the timings.

Usage: compare_devices.py CPU.json GPU.json
"""
import json
import sys


def field(report, *path):
    for key in path:
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def main():
    first, second = (json.load(open(path)) for path in sys.argv[1:3])
    print(f"device: {first['device']} | {second['device']}")
    for a, b in zip(first["results"], second["results"]):
        for name in ["mass_recall", "mass_recall_head", "topk_recall", "out_rel_err",
                     "out_cosine", "kl_sparse"]:
            print(f"k {a['k']} {name} (sparse rows, mean): "
                  f"{field(a, name, 'sparse', 'mean')} | {field(b, name, 'sparse', 'mean')}")
        print(f"k {a['k']} out_rel_err_global: {a['out_rel_err_global']} | {b['out_rel_err_global']}")
        print(f"k {a['k']} needle_recall: {a['needle_recall']} | {b['needle_recall']}")
    print(f"timings_ms: {first['timings_ms']} | {second['timings_ms']}")


if __name__ == "__main__":
    main()
