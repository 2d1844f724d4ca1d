// Calibration of the cost model (dsa-cost --calibrate, DESIGN.md §3): this machine's achieved
// rates, measured with the toolkit's own kernels, in place of a preset's datasheet rates.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "dsa/cost.hpp"

namespace dsa {

// Achieved rates of this machine, measured with the toolkit's own kernels (CPU).
struct Calibration {
  std::string device;                  // "cpu"
  double attention_tflops = 0;         // dense_attention, MQA mode: replaces bf16_tflops
  double indexer_tflops = 0;           // IndexerKernel::score_rows (a GEMM): replaces fp8_tflops
  double sparse_attention_tflops = 0;  // sparse_attention: reported only
  double memory_tb_s = 0;       // a parallel memcpy, read + write bytes: replaces memory_tb_s
  nlohmann::json measurements;  // per kernel: problem, FLOPs or bytes, repeats, seconds
};
// About `seconds` of timing per kernel.
Calibration calibrate(double seconds);
// The hardware with the measured rates and efficiencies 1 (the rates are achieved ones).
HardwareSpec calibrated_hardware(const HardwareSpec& hardware, const Calibration& calibration);
nlohmann::json calibration_json(const Calibration& calibration);

}  // namespace dsa
