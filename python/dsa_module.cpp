// The Python module `dsa`: the tools' operations over NumPy arrays (and CPU tensors with DLPack),
// their reports as dicts, dsa::Error as Python exceptions carrying the exit code. Like the apps,
// nothing numeric lives here: every number comes from the library.
#include <dlfcn.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "arrays.hpp"
#include "dsa/attention.hpp"
#include "dsa/compressed_attention.hpp"
#include "dsa/cost.hpp"
#include "dsa/device.hpp"
#include "dsa/error.hpp"
#include "dsa/indexer.hpp"
#include "dsa/indexer_weights.hpp"
#include "dsa/io.hpp"
#include "dsa/kv_cache.hpp"
#include "dsa/metrics.hpp"
#include "dsa/parallel.hpp"
#include "dsa/precision.hpp"
#include "dsa/report.hpp"
#include "dsa/topk.hpp"

namespace py = pybind11;
using namespace pybind11::literals;

namespace dsa::python {

namespace {

// ---------------------------------------------------------------------------------------------
// Errors: dsa.Error(Exception) with .exit_code; UsageError (2) and BadInputError (3) are also
// ValueErrors, RuntimeFailure (1) a RuntimeError.

PyObject* error_class = nullptr;
PyObject* usage_error_class = nullptr;
PyObject* bad_input_error_class = nullptr;
PyObject* runtime_failure_class = nullptr;

PyObject* add_exception(py::module_& m, const char* name, PyObject* bases, const char* doc,
                        std::optional<ExitCode> code) {
  const std::string qualified = std::string("dsa.") + name;
  PyObject* cls = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases, nullptr);
  if (cls == nullptr) throw py::error_already_set();
  if (code) py::handle(cls).attr("exit_code") = static_cast<int>(*code);
  m.add_object(name, py::handle(cls));
  return cls;
}

void register_errors(py::module_& m) {
  error_class = add_exception(m, "Error", PyExc_Exception,
                              "A failure the toolkit reports; .exit_code is the tools' exit code "
                              "for it (1 runtime, 2 usage, 3 bad input).",
                              std::nullopt);
  const auto bases = [](PyObject* second) {
    return py::make_tuple(py::handle(error_class), py::handle(second));
  };
  usage_error_class = add_exception(m, "UsageError", bases(PyExc_ValueError).ptr(),
                                    "Arguments that contradict each other or are out of range "
                                    "(the tools' exit code 2).",
                                    ExitCode::usage);
  bad_input_error_class = add_exception(m, "BadInputError", bases(PyExc_ValueError).ptr(),
                                        "A tensor that does not hold what it should: shape, "
                                        "dtype, device, indices (the tools' exit code 3).",
                                        ExitCode::bad_input);
  runtime_failure_class = add_exception(m, "RuntimeFailure", bases(PyExc_RuntimeError).ptr(),
                                        "A failure at run time: no GPU, a file that cannot be "
                                        "written (the tools' exit code 1).",
                                        ExitCode::runtime);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      PyObject* cls = e.code() == ExitCode::usage       ? usage_error_class
                      : e.code() == ExitCode::bad_input ? bad_input_error_class
                                                        : runtime_failure_class;
      py::object exception = py::reinterpret_borrow<py::object>(cls)(e.what());
      exception.attr("exit_code") = static_cast<int>(e.code());
      PyErr_SetObject(cls, exception.ptr());
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Reports: nlohmann::json to dict/list/float/int/str/None, as the tools write them (a
// non-finite number is written as null).

py::object to_python(const nlohmann::json& j) {
  using value_t = nlohmann::json::value_t;
  switch (j.type()) {
    case value_t::boolean:
      return py::bool_(j.get<bool>());
    case value_t::number_integer:
      return py::int_(j.get<int64_t>());
    case value_t::number_unsigned:
      return py::int_(j.get<uint64_t>());
    case value_t::number_float: {
      const double x = j.get<double>();
      return std::isfinite(x) ? py::object(py::float_(x)) : py::object(py::none());
    }
    case value_t::string:
      return py::str(j.get_ref<const std::string&>());
    case value_t::array: {
      py::list out;
      for (const auto& item : j) out.append(to_python(item));
      return out;
    }
    case value_t::object: {
      py::dict out;
      for (const auto& [key, value] : j.items()) out[py::str(key)] = to_python(value);
      return out;
    }
    default:
      return py::none();
  }
}

// The header every report carries, its command being the Python function called.
nlohmann::json header(const std::string& tool, const char* function) {
  const char* argv[] = {function};
  return report_header(tool, 1, argv);
}

nlohmann::json output_json(const Tensor& t) {
  return {{"name", t.name}, {"shape", t.shape}, {"dtype", dtype_name(t.dtype)}};
}

// ---------------------------------------------------------------------------------------------
// Arguments

// Indices as the tools read them from a token file (io.hpp read_token_file): i32 or i64.
Tensor indices_tensor(const py::object& object, const std::string& name) {
  Tensor t = to_tensor(object, name);
  if (t.dtype != DType::i32 && t.dtype != DType::i64) {
    bad_input("{}: token indices must be i32 or i64, got {}", name, dtype_name(t.dtype));
  }
  return t;
}

// The indexer's keywords (the tools' --precision, --hadamard, --ue8m0, --raw-weights,
// --query-block).
struct IndexerArgs {
  std::string precision = "f32";
  bool hadamard = false, ue8m0 = false, raw_weights = false;
  int64_t query_block = 16;

  bool given() const {
    return precision != "f32" || hadamard || ue8m0 || raw_weights || query_block != 16;
  }
  IndexerConfig config() const {
    IndexerConfig c;
    c.precision = naming("precision", [&] { return parse_precision(precision); });
    if (query_block < 1) bad_usage("query_block: must be an integer >= 1, got {}", query_block);
    c.hadamard = hadamard;
    c.ue8m0 = ue8m0;
    c.raw_weights = raw_weights;
    c.query_block = query_block;
    naming("ue8m0", [&] { validate_indexer_config(c); });
    return c;
  }
};

// scale=None, "default", "deepseek-v3.2" or a number: resolve_softmax_scale's text (a number as
// its shortest round-trip decimal, so the library reads back the same double).
std::string scale_text(const py::object& scale) {
  if (scale.is_none()) return "";
  if (py::isinstance<py::str>(scale) || py::isinstance<py::bool_>(scale)) {
    return py::str(scale);
  }
  return py::repr(py::float_(scale));
}

// make_indexer_inputs, or over compressed keys (the tools' --compress-ratio and --tokens).
IndexerInputs indexer_inputs(const Tensor& q, const Tensor& k, const Tensor& w,
                             const IndexerConfig& config, int64_t ratio,
                             std::optional<int64_t> tokens) {
  return naming_in_usage_errors(
      "hadamard", [&] { return make_indexer_inputs(q, k, w, config, ratio, tokens); });
}

// Rows [row_begin, row_begin + rows) of batch element `batch`, `width` values each, into `out`
// of `queries` rows per batch element.
template <typename T>
void put_rows(Tensor& out, int64_t queries, int64_t width, int64_t batch, int64_t row_begin,
              int64_t rows, const T* values) {
  if (rows * width == 0) return;
  T* dst = mutable_data<T>(out) + ((batch * queries + row_begin) * width);
  std::memcpy(dst, values, static_cast<std::size_t>(rows * width) * sizeof(T));
}

// The tools' check of -k (apps/common.hpp integer_in(1, kLargestTopk)): indices are int32.
void check_topk(int64_t k) {
  constexpr int64_t largest = std::numeric_limits<int32_t>::max();
  if (k < 1) bad_usage("topk: must be an integer >= 1, got {}", k);
  if (k > largest) bad_usage("topk: must be an integer <= {}, got {}", largest, k);
}

py::object with_report(py::tuple result, bool want_report, const nlohmann::json& report) {
  if (!want_report) return result.size() == 1 ? result[0] : py::object(result);
  py::list items(result);
  items.append(to_python(report));
  return py::tuple(items);
}

// ---------------------------------------------------------------------------------------------
// score, select, project_indexer

py::object score_op(py::object q_index, py::object k_index, py::object weights,
                    const std::string& precision, bool hadamard, bool ue8m0, bool raw_weights,
                    int64_t query_block, int64_t compress_ratio, std::optional<int64_t> tokens,
                    const std::string& device, bool want_report) {
  Stopwatch total;
  const Tensor q = to_tensor(q_index, "q_index"), k = to_tensor(k_index, "k_index"),
               w = to_tensor(weights, "weights");
  const IndexerConfig config =
      IndexerArgs{precision, hadamard, ue8m0, raw_weights, query_block}.config();
  const IndexerInputs inputs = indexer_inputs(q, k, w, config, compress_ratio, tokens);
  const DeviceChoice choice =
      naming("device", [&] { return choose_device(device, inputs, config); });
  Tensor out = make_tensor(DType::f32, score_shape(inputs), "scores");
  StageTimes times;
  {
    py::gil_scoped_release release;
    indexer_scores(
        inputs, config,
        [&](const ScoreBlock& b) {
          put_rows(out, inputs.queries, b.keys, b.batch, b.row_begin, b.rows, b.scores);
        },
        &times, choice.device);
  }
  nlohmann::json report;
  if (want_report) {
    report = header("dsa-score", "dsa.score");
    report["schema"] = kScoreSchema;
    report_device(report, choice);
    for (const Tensor* t : {&q, &k, &w}) report["inputs"].push_back(tensor_json(*t));
    report.update(indexer_report(inputs, config));
    report["outputs"] = {output_json(out)};
    add_timings(report, times, total.seconds());
  }
  return with_report(py::make_tuple(to_array(out)), want_report, report);
}

py::object select_op(py::object q_index, py::object k_index, py::object weights, py::object scores,
                     int64_t topk, const std::string& precision, bool hadamard, bool ue8m0,
                     bool raw_weights, int64_t query_block, int64_t compress_ratio,
                     std::optional<int64_t> tokens, const std::string& device, bool want_report) {
  Stopwatch total;
  const bool fused = scores.is_none();
  const IndexerArgs indexer{precision, hadamard, ue8m0, raw_weights, query_block};
  if (fused && (q_index.is_none() || k_index.is_none() || weights.is_none())) {
    bad_usage("give either q_index, k_index and weights (fused), or scores=");
  }
  if (!fused) {
    if (!q_index.is_none() || !k_index.is_none() || !weights.is_none()) {
      bad_usage("scores= excludes q_index, k_index and weights");
    }
    if (indexer.given() || compress_ratio != 1 || tokens) {
      bad_usage(
          "precision, hadamard, ue8m0, raw_weights, query_block, compress_ratio and tokens "
          "apply to the fused mode (q_index, k_index, weights), not to scores=");
    }
    if (device != "cpu") bad_usage("device: selection from scores= runs on the CPU");
  }
  check_topk(topk);
  nlohmann::json report = header("dsa-select", "dsa.select");
  report["schema"] = kSelectSchema;
  std::vector<Tensor> in;
  IndexerConfig config;
  IndexerInputs inputs;
  DeviceChoice choice;
  Shape shape;
  if (fused) {
    in = {to_tensor(q_index, "q_index"), to_tensor(k_index, "k_index"),
          to_tensor(weights, "weights")};
    config = indexer.config();
    inputs = indexer_inputs(in[0], in[1], in[2], config, compress_ratio, tokens);
    choice = naming("device", [&] { return choose_device(device, inputs, config, topk); });
    shape = selection_shape(inputs, topk);
  } else {
    in = {to_tensor(scores, "scores")};
    shape = selection_shape(in[0], topk);
  }
  Tensor indices = make_tensor(DType::i32, shape, "indices");
  Tensor selected = make_tensor(DType::f32, shape, "scores");
  const int64_t queries = shape.size() >= 2 ? shape[shape.size() - 2] : 0;
  const auto collect = [&](const SelectionBlock& b) {
    put_rows(indices, queries, b.k, b.batch, b.row_begin, b.rows, b.indices);
    put_rows(selected, queries, b.k, b.batch, b.row_begin, b.rows, b.scores);
  };
  StageTimes times;
  {
    py::gil_scoped_release release;
    if (fused) {
      select_from_indexer(inputs, config, topk, collect, &times, choice.device);
    } else {
      select_from_scores(in[0], topk, collect, &times);
    }
  }
  if (want_report) {
    report_device(report, choice);
    for (const Tensor& t : in) report["inputs"].push_back(tensor_json(t));
    if (fused) report.update(indexer_report(inputs, config));
    report["topk"] = topk;
    report["mode"] = fused ? "fused" : "scores";
    report["outputs"] = {output_json(indices), output_json(selected)};
    add_timings(report, times, total.seconds());
  }
  return with_report(py::make_tuple(to_array(indices), to_array(selected)), want_report, report);
}

py::tuple project_op(py::object hidden, const std::string& indexer_weights,
                     const std::string& prefix) {
  const Tensor h = to_tensor(hidden, "hidden");
  IndexerProjection p;
  {
    py::gil_scoped_release release;
    p = project_indexer(h, read_indexer_weights(indexer_weights, prefix));
  }
  return py::make_tuple(to_array(p.q_index), to_array(p.k_index), to_array(p.weights));
}

// ---------------------------------------------------------------------------------------------
// attend

// The attention keywords shared by attend and compare: q with kv (MQA) or k and v (MHA/GQA),
// or DeepSeek-V4's attention over kv's raw tokens and compressed entries.
struct AttentionArgs {
  py::object q, kv, k, v;
  std::optional<int64_t> d_v;
  py::object scale;
  std::optional<std::string> attention;
  py::object compressed, sink;
  std::optional<int64_t> window;
  std::string kv_cache = "bf16";  // kv_cache.hpp: "bf16" or "fp8"

  void check() const {
    if (!attention) {
      if (!compressed.is_none() || !sink.is_none() || window) {
        bad_usage("compressed, sink and window apply with attention=\"csa\", \"hca\" or \"swa\"");
      }
      if (kv.is_none() && k.is_none() && v.is_none()) bad_usage("give either kv, or k and v");
      if (!kv.is_none() && (!k.is_none() || !v.is_none())) bad_usage("kv excludes k and v");
      if (kv.is_none() && (k.is_none() || v.is_none())) bad_usage("k and v go together");
      if (d_v && kv.is_none()) {
        bad_usage("d_v applies to kv (the MQA layout); with k and v it is v's last dimension");
      }
      return;
    }
    if (kv.is_none() || !k.is_none() || !v.is_none()) {
      bad_usage("attention=\"{}\" reads the raw tokens from kv (K = V), not k and v", *attention);
    }
    if (d_v) bad_usage("d_v does not apply to attention=\"{}\" (K = V)", *attention);
  }
};

// q, then kv or k and v, and the validated inputs pointing into them.
struct AttentionTensors {
  std::vector<Tensor> tensors;
  AttentionInputs inputs;
  SoftmaxScale scale;
  std::unique_ptr<Fp8CacheAttention> fp8;  // kv_cache="fp8" over a floating kv
};
void load_attention(const AttentionArgs& args, AttentionTensors& out) {
  out.tensors.reserve(3);
  out.tensors.push_back(to_tensor(args.q, "q"));
  if (!args.kv.is_none()) {
    out.tensors.push_back(to_tensor(args.kv, "kv"));
    out.inputs = naming_in_usage_errors("d_v", [&] {
      return make_mqa_inputs(out.tensors[0], out.tensors[1], args.d_v.value_or(512));
    });
  } else {
    out.tensors.push_back(to_tensor(args.k, "k"));
    out.tensors.push_back(to_tensor(args.v, "v"));
    out.inputs = make_mha_inputs(out.tensors[0], out.tensors[1], out.tensors[2]);
  }
  out.scale = naming(
      "scale", [&] { return resolve_softmax_scale(scale_text(args.scale), out.inputs.d_qk); });
  out.fp8 = naming("kv_cache",
                   [&] { return fp8_cache_attention(out.inputs, parse_kv_cache(args.kv_cache)); });
}

struct V4Tensors {
  std::vector<Tensor> tensors;  // q, kv, then compressed and sink where given
  CompressedAttentionInputs inputs;
  SoftmaxScale scale;
  std::unique_ptr<V4Fp8CacheAttention> fp8;  // kv_cache="fp8" over floating kv and compressed
  // The inputs the attention reads: over V4's fp8 caches with kv_cache="fp8".
  const CompressedAttentionInputs& attended() const { return fp8 ? fp8->inputs : inputs; }
};
void load_v4_attention(const AttentionArgs& args, V4Tensors& out) {
  const V4Attention kind = naming("attention", [&] { return parse_v4_attention(*args.attention); });
  if (kind != V4Attention::swa && args.compressed.is_none()) {
    bad_usage("attention=\"{}\" needs compressed", *args.attention);
  }
  if (kind == V4Attention::swa && !args.compressed.is_none()) {
    bad_usage("attention=\"swa\" attends over the window alone: drop compressed");
  }
  out.tensors.reserve(4);  // the inputs point into it
  out.tensors.push_back(to_tensor(args.q, "q"));
  out.tensors.push_back(to_tensor(args.kv, "kv"));
  const Tensor* compressed = nullptr;
  const Tensor* sink = nullptr;
  if (!args.compressed.is_none()) {
    out.tensors.push_back(to_tensor(args.compressed, "compressed"));
    compressed = &out.tensors.back();
  }
  if (!args.sink.is_none()) {
    out.tensors.push_back(to_tensor(args.sink, "sink"));
    sink = &out.tensors.back();
  }
  out.inputs = naming_in_usage_errors("window", [&] {
    return make_compressed_attention_inputs(out.tensors[0], out.tensors[1], compressed, sink, kind,
                                            args.window.value_or(128));
  });
  out.scale = naming("scale",
                     [&] { return resolve_softmax_scale(scale_text(args.scale), out.inputs.dim); });
  // uint8 caches are read as they are
  out.fp8 = naming("kv_cache", [&] {
    return fp8_v4_cache_attention(out.inputs, parse_kv_cache(args.kv_cache));
  });
}

py::object attend_op(const AttentionArgs& args, py::object indices_object, bool dense,
                     bool future_as_padding, const std::string& device, bool want_report) {
  Stopwatch total;
  args.check();
  const bool has_indices = !indices_object.is_none();
  if (has_indices && dense) bad_usage("indices and dense=True exclude each other");
  if (future_as_padding && !has_indices) bad_usage("future_as_padding applies to indices");
  nlohmann::json report = header("dsa-attend", "dsa.attend");
  report["schema"] = kAttendSchema;
  StageTimes times;
  std::optional<Tensor> out, lse;
  int64_t queries = 0;
  const AttentionSink collect = [&](const AttentionBlock& b) {
    put_rows(*out, queries, b.heads * b.d_v, b.batch, b.row_begin, b.rows, b.out);
    put_rows(*lse, queries, b.heads, b.batch, b.row_begin, b.rows, b.lse);
  };
  std::optional<Tensor> indices;

  if (args.attention) {  // DeepSeek-V4: window + compressed entries + sink
    if (future_as_padding) bad_usage("future_as_padding is for V3.2 selections");
    V4Tensors loaded;
    load_v4_attention(args, loaded);
    const CompressedAttentionInputs& inputs = loaded.attended();
    if (inputs.kind == V4Attention::csa && !has_indices && !dense) {
      bad_usage(
          "attention=\"csa\": give indices (the selection), or dense=True for every visible "
          "entry");
    }
    if (inputs.kind != V4Attention::csa && dense) {
      bad_usage("attention=\"{}\" has no selection to replace: drop dense", *args.attention);
    }
    if (inputs.kind != V4Attention::csa && has_indices) {
      bad_usage("attention=\"{}\" attends {}: it takes no indices", *args.attention,
                inputs.kind == V4Attention::hca ? "every visible entry" : "the window alone");
    }
    const DeviceChoice choice = naming("device", [&] { return choose_device(device, inputs); });
    if (has_indices) {
      indices = indices_tensor(indices_object, "indices");
      validate_compressed_indices(inputs, *indices);
    }
    queries = inputs.queries;
    out = make_tensor(DType::f32, compressed_attention_output_shape(inputs), "out");
    lse = make_tensor(DType::f32, compressed_attention_lse_shape(inputs), "lse");
    {
      py::gil_scoped_release release;
      compressed_attention(inputs, indices ? &*indices : nullptr, loaded.scale.value, collect,
                           &times, choice.device);
    }
    if (want_report) {
      report_device(report, choice);
      for (const Tensor& t : loaded.tensors) report["inputs"].push_back(tensor_json(t));
      if (indices) report["inputs"].push_back(tensor_json(*indices));
      report.update(compressed_attention_report(inputs, dense, loaded.scale));
    }
  } else {
    if (!has_indices && !dense) bad_usage("give indices, or dense=True for full attention");
    AttentionTensors loaded;
    load_attention(args, loaded);
    const AttentionInputs& inputs = loaded.fp8 ? loaded.fp8->inputs : loaded.inputs;
    const DeviceChoice choice = naming("device", [&] { return choose_device(device, inputs); });
    int64_t dropped = 0;
    if (has_indices) {
      indices = indices_tensor(indices_object, "indices");
      if (future_as_padding) {
        DroppedIndices kept = drop_future_indices(inputs, *indices);
        indices = std::move(kept.indices);
        dropped = kept.dropped;
      }
      validate_indices(inputs, *indices, {});
    }
    queries = inputs.queries;
    out = make_tensor(DType::f32, attention_output_shape(inputs), "out");
    lse = make_tensor(DType::f32, attention_lse_shape(inputs), "lse");
    {
      py::gil_scoped_release release;
      if (dense) {
        dense_attention(inputs, loaded.scale.value, collect, &times, choice.device);
      } else {
        sparse_attention(inputs, *indices, loaded.scale.value, collect, &times, choice.device);
      }
    }
    if (want_report) {
      report_device(report, choice);
      for (const Tensor& t : loaded.tensors) report["inputs"].push_back(tensor_json(t));
      if (indices) report["inputs"].push_back(tensor_json(*indices));
      if (future_as_padding) report["future_entries_dropped"] = dropped;
      report.update(attention_report(inputs, dense, loaded.scale));
    }
  }
  if (want_report) {
    report["outputs"] = {output_json(*out), output_json(*lse)};
    add_timings(report, times, total.seconds());
  }
  return with_report(py::make_tuple(to_array(*out), to_array(*lse)), want_report, report);
}

// ---------------------------------------------------------------------------------------------
// compare: the report dsa-compare writes (schema dsa-compare/2), as a dict.

std::vector<int64_t> topk_list(const py::object& topk, int64_t fallback) {
  if (topk.is_none()) return {fallback};
  const std::vector<int64_t> out = PyIndex_Check(topk.ptr())  // an int, NumPy's too
                                       ? std::vector<int64_t>{topk.cast<int64_t>()}
                                       : topk.cast<std::vector<int64_t>>();
  for (const int64_t k : out) check_topk(k);
  return out;
}

py::object compare_op(const AttentionArgs& args, py::object q_index, py::object k_index,
                      py::object weights, py::object indices_object, py::object topk_object,
                      py::object needles_object, const IndexerArgs& indexer, bool future_as_padding,
                      std::optional<std::string> reference, const std::string& device) {
  Stopwatch total;
  args.check();
  const bool has_indexer = !q_index.is_none() || !k_index.is_none() || !weights.is_none();
  const bool has_indices = !indices_object.is_none();
  if (has_indexer && (q_index.is_none() || k_index.is_none() || weights.is_none())) {
    bad_usage("q_index, k_index and weights go together");
  }
  if (has_indexer && has_indices)
    bad_usage("indices excludes the indexer (q_index, k_index, weights)");
  if (!has_indexer && indexer.given()) {
    bad_usage("precision, hadamard, ue8m0, raw_weights and query_block apply to the indexer");
  }
  if (has_indices && !topk_object.is_none()) {
    bad_usage("topk: with indices, k is their width");
  }
  if (future_as_padding && !has_indices) bad_usage("future_as_padding applies to indices");
  if (reference && !args.attention) bad_usage("reference applies with attention=");
  nlohmann::json report = header("dsa-compare", "dsa.compare");
  report["schema"] = kCompareSchema;
  StageTimes times;
  std::optional<Tensor> qi, ki, wi, indices, needles;
  const auto load_indexer_tensors = [&] {
    qi = to_tensor(q_index, "q_index");
    ki = to_tensor(k_index, "k_index");
    wi = to_tensor(weights, "weights");
  };
  const auto load_needles = [&] {
    if (needles_object.is_none()) return;
    needles = to_tensor(needles_object, "needles");
  };
  // The library's fields of either kind of comparison, then what only this call knows.
  const auto finish = [&](const nlohmann::json& fields, const SoftmaxScale& scale) {
    report.update(fields);
    report["scale_rule"] = scale.rule;
    add_timings(report, times, total.seconds());
    return to_python(report);
  };

  if (args.attention) {  // DeepSeek-V4: CSA's selection or HCA's compression
    if (future_as_padding) bad_usage("future_as_padding is for V3.2 selections");
    Stopwatch load;
    V4Tensors loaded;
    load_v4_attention(args, loaded);
    if (args.kv_cache == "fp8" && !loaded.fp8) {
      bad_usage(
          "kv_cache=\"fp8\" measures V4's fp8 caches against the values: give kv and "
          "compressed as floating values, not uint8 caches");
    }
    CompressedCompareInputs inputs;
    inputs.attention = loaded.inputs;
    inputs.fp8_cache = loaded.fp8 ? &loaded.fp8->inputs : nullptr;
    inputs.scale = loaded.scale.value;
    inputs.reference =
        naming("reference", [&] { return parse_v4_reference(reference.value_or("every-entry")); });
    const CompressedAttentionInputs& a = inputs.attention;
    for (const Tensor& t : loaded.tensors) report["inputs"].push_back(tensor_json(t));
    if (a.kind == V4Attention::csa && has_indexer) {
      load_indexer_tensors();
      inputs.indexer_config = indexer.config();
      inputs.indexer = naming_in_usage_errors("hadamard", [&] {
        return make_compressed_indexer_inputs(*qi, *ki, *wi, inputs.indexer_config, a.ratio,
                                              a.tokens);
      });
      for (const Tensor* t : {&*qi, &*ki, &*wi}) report["inputs"].push_back(tensor_json(*t));
      inputs.topk = topk_list(topk_object, 512);  // DeepSeek-V4-Flash's index_topk
    } else if (a.kind == V4Attention::csa && has_indices) {
      indices = indices_tensor(indices_object, "indices");
      inputs.indices = &*indices;
      inputs.topk = {indices->shape.empty() ? 0 : indices->shape.back()};
      report["inputs"].push_back(tensor_json(*indices));
    } else if (a.kind == V4Attention::csa) {
      bad_usage(
          "attention=\"csa\": give the indexer (q_index, k_index over the compressed keys, "
          "weights) or indices");
    } else if (has_indexer || has_indices) {
      bad_usage("attention=\"{}\" attends every visible entry: no indexer or indices",
                *args.attention);
    }
    load_needles();
    if (needles) {
      inputs.needles = &*needles;
      report["inputs"].push_back(tensor_json(*needles));
    }
    const DeviceChoice choice =
        naming("device", [&] { return choose_device(device, inputs.attention); });
    report_device(report, choice);
    times.add("load", load.seconds());
    Comparison comparison;
    {
      py::gil_scoped_release release;
      comparison = compare_compressed_attention(inputs, &times, choice.device);
    }
    return finish(comparison_report(inputs, comparison), loaded.scale);
  }

  if (!has_indexer && !has_indices) {
    bad_usage("give the indexer (q_index, k_index and weights) or indices");
  }
  AttentionTensors loaded;
  load_attention(args, loaded);
  if (args.kv_cache == "fp8" && !loaded.fp8) {
    bad_usage(
        "kv_cache=\"fp8\" measures the fp8 cache against the bf16 one: give kv as floating "
        "values, not a uint8 cache");
  }
  CompareInputs inputs;
  inputs.attention = loaded.inputs;
  inputs.fp8_cache = loaded.fp8 ? &loaded.fp8->inputs : nullptr;
  inputs.scale = loaded.scale.value;
  for (const Tensor& t : loaded.tensors) report["inputs"].push_back(tensor_json(t));
  if (has_indexer) {
    load_indexer_tensors();
    inputs.indexer_config = indexer.config();
    inputs.indexer = naming_in_usage_errors(
        "hadamard", [&] { return make_indexer_inputs(*qi, *ki, *wi, inputs.indexer_config); });
    for (const Tensor* t : {&*qi, &*ki, &*wi}) report["inputs"].push_back(tensor_json(*t));
    inputs.topk = topk_list(topk_object, 2048);
  } else {
    indices = indices_tensor(indices_object, "indices");
    if (future_as_padding) {
      DroppedIndices kept = drop_future_indices(inputs.attention, *indices);
      indices = std::move(kept.indices);
      report["future_entries_dropped"] = kept.dropped;
    }
    inputs.indices = &*indices;
    inputs.topk = {indices->shape.empty() ? 0 : indices->shape.back()};
    report["inputs"].push_back(tensor_json(*indices));
  }
  load_needles();
  if (needles) {
    inputs.needles = &*needles;
    report["inputs"].push_back(tensor_json(*needles));
  }
  const DeviceChoice choice = naming("device", [&] { return choose_device(device, inputs); });
  report_device(report, choice);
  Comparison comparison;
  naming_in_usage_errors("topk", [&] {
    py::gil_scoped_release release;
    comparison = compare_attention(inputs, &times, choice.device);
  });
  return finish(comparison_report(inputs, comparison), loaded.scale);
}

// ---------------------------------------------------------------------------------------------
// cost: the report dsa-cost writes (schema dsa-cost/3) as a dict, or its CSV as text.

// This module's own file, to find the presets relative to it (as the tools do relative to theirs:
// find_presets reads /proc/self/exe, which here is python3).
std::filesystem::path module_directory() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<const void*>(&module_directory), &info) == 0 || !info.dli_fname) {
    return {};
  }
  return std::filesystem::path(info.dli_fname).parent_path();
}

// presets=DIR, else $DSA_PRESETS, else the installed presets or the build tree's next to this
// module.
PresetLibrary presets_for(const std::optional<std::string>& dir) {
  PresetLibrary presets;
  if (dir) {
    presets = find_presets(*dir);
  } else if (const char* env = std::getenv("DSA_PRESETS"); env && *env) {
    presets = find_presets("");
  } else {
    const std::filesystem::path here = module_directory();
    const std::filesystem::path installed =
        (here / DSA_PYTHON_PRESETS_INSTALLED).lexically_normal();
    const std::filesystem::path built = (here / DSA_PYTHON_PRESETS_BUILT).lexically_normal();
    std::error_code error;
    const bool in_build_tree = !std::filesystem::exists(installed / "hardware.json", error) &&
                               std::filesystem::exists(built / "hardware.json", error);
    presets = find_presets((in_build_tree ? built : installed).string());
  }
  presets.hint = "give presets=DIR or set DSA_PRESETS";
  return presets;
}

// set=["dsa.topk=1024", ...] or {"dsa.topk": 1024, ...} (a value as JSON).
std::vector<std::string> override_list(const py::object& set) {
  if (set.is_none()) return {};
  if (py::isinstance<py::str>(set)) return {set.cast<std::string>()};
  if (py::isinstance<py::dict>(set)) {
    py::module_ json = py::module_::import("json");
    std::vector<std::string> out;
    for (const auto& [key, value] : set.cast<py::dict>()) {
      out.push_back(py::str(key).cast<std::string>() + "=" +
                    json.attr("dumps")(value).cast<std::string>());
    }
    return out;
  }
  return set.cast<std::vector<std::string>>();
}

// quantize_kv_cache / dequantize_kv_cache: kv_cache.hpp's conversions, array to array.
py::array quantize_kv_cache_op(py::object kv) {
  const Tensor t = to_tensor(kv, "kv");
  Tensor cache;
  {
    py::gil_scoped_release release;
    cache = quantize_kv_cache_fp8(t);
  }
  return to_array(cache);
}

py::array dequantize_kv_cache_op(py::object cache) {
  const Tensor t = to_tensor(cache, "cache");
  if (!is_fp8_kv_cache(t)) {
    bad_input("cache: expected FlashMLA's fp8 cache, uint8 [..., {}], got {} {}", kFp8CacheBytes,
              dtype_name(t.dtype), shape_string(t.shape));
  }
  Shape shape = t.shape;
  shape.back() = kFp8CacheDim;
  Tensor out = make_tensor(DType::f32, shape, "kv");
  {
    py::gil_scoped_release release;
    dequantize_kv_cache_fp8(t, 0, t.numel() / kFp8CacheBytes, mutable_data<float>(out));
  }
  return to_array(out);
}

py::object cost_op(const std::string& hardware_name, std::optional<std::string> dense_model,
                   std::optional<std::string> dsa_model, py::object compare_models_object,
                   std::optional<std::string> baseline, std::optional<std::string> presets_dir,
                   int64_t max_context, int64_t step, int64_t batch, int64_t prefill_chunk,
                   py::object set, bool calibrate_rates, std::optional<double> calibrate_seconds,
                   std::optional<std::string> device,
                   std::optional<std::vector<int64_t>> calibrate_positions,
                   std::optional<int64_t> calibrate_tokens, const std::string& format,
                   std::optional<std::string> plot) {
  Stopwatch total;
  std::vector<std::string> compared;
  if (py::isinstance<py::str>(compare_models_object)) {
    compared = {compare_models_object.cast<std::string>()};
  } else if (!compare_models_object.is_none()) {
    compared = compare_models_object.cast<std::vector<std::string>>();
  }
  if (!compared.empty() && (dense_model || dsa_model)) {
    bad_usage("compare_models excludes dense_model and dsa_model");
  }
  if (baseline && compared.empty()) bad_usage("baseline applies to compare_models");
  if (max_context < 1 || max_context > kMaxCostPosition) {
    bad_usage("max_context: must be an integer in [1, {}], got {}", kMaxCostPosition, max_context);
  }
  if (step < 1) bad_usage("step: must be an integer >= 1, got {}", step);
  if (batch < 1) bad_usage("batch: must be an integer >= 1, got {}", batch);
  if (prefill_chunk < 1) bad_usage("prefill_chunk: must be an integer >= 1, got {}", prefill_chunk);
  if (calibrate_seconds && !calibrate_rates)
    bad_usage("calibrate_seconds applies to calibrate=True");
  if (device && !calibrate_rates) bad_usage("device applies to calibrate=True");
  if (calibrate_positions && !calibrate_rates)
    bad_usage("calibrate_positions applies to calibrate=True");
  if (calibrate_tokens && !calibrate_rates) bad_usage("calibrate_tokens applies to calibrate=True");
  if (calibrate_tokens && *calibrate_tokens < 1) {
    bad_usage("calibrate_tokens: must be an integer >= 1, got {}", *calibrate_tokens);
  }
  const double seconds = calibrate_seconds.value_or(1.0);
  if (!(seconds >= 0 && seconds <= 60)) {
    bad_usage("calibrate_seconds: must be a number in [0, 60], got {}", seconds);
  }
  if (format != "json" && format != "csv") {
    bad_usage("format: expected \"json\" or \"csv\", got \"{}\"", format);
  }
  CostRequest request;
  request.hardware = hardware_name;
  if (dense_model) request.dense_model = *dense_model;
  if (dsa_model) request.dsa_model = *dsa_model;
  request.compare_models = compared;
  request.baseline = baseline.value_or("");
  request.workload.decode_batch = batch;
  request.workload.prefill_chunk = prefill_chunk;
  request.max_context = max_context;
  request.step = step;
  request.overrides = override_list(set);
  request.calibrate = calibrate_rates;
  request.calibrate_seconds = seconds;
  request.device = device.value_or("cpu");
  request.calibrate_positions = calibrate_positions.value_or(std::vector<int64_t>{});
  request.calibrate_tokens = calibrate_tokens.value_or(0);
  request.want_csv = format == "csv";
  request.want_plot = plot.has_value();
  request.names = {"set", "baseline", "compare_models", "calibrate_positions"};

  const PresetLibrary presets = presets_for(presets_dir);
  StageTimes times;
  CostRun run;
  {
    py::gil_scoped_release release;
    run = run_cost(presets, request, &times);
  }
  if (plot) {
    OutputFile file(*plot);
    file.write(run.svg);
    file.commit();
  }
  if (format == "csv") return py::str(run.csv);
  nlohmann::json report = header("dsa-cost", "dsa.cost");
  report.update(run.report);
  report["timings_ms"] = timings_json(times, total.seconds());
  return to_python(report);
}

std::vector<std::string> devices() {
  std::vector<std::string> out = {"cpu"};
  if (cuda_available()) out.push_back("cuda");
  return out;
}

}  // namespace

}  // namespace dsa::python

PYBIND11_MODULE(dsa, m) {
  using namespace dsa::python;
  m.doc() =
      "DeepSeek sparse attention (DSA), measured: the lightning indexer's scores, top-k "
      "selection, attention over the selection, its fidelity against dense attention and the "
      "cost model, as the command-line tools compute them (docs/DESIGN.md). Arrays go in "
      "without copies where their layout allows (C-contiguous NumPy arrays, CPU tensors with "
      "DLPack) and come out as NumPy arrays over the library's buffers.";
  m.attr("__version__") = dsa::version();
  m.attr("has_cuda") = py::bool_(DSA_PYTHON_HAS_CUDA);
  register_errors(m);

  m.def("score", &score_op, py::arg("q_index"), py::arg("k_index"), py::arg("weights"),
        py::kw_only(), py::arg("precision") = "f32", py::arg("hadamard") = false,
        py::arg("ue8m0") = false, py::arg("raw_weights") = false, py::arg("query_block") = 16,
        py::arg("compress_ratio") = 1, py::arg("tokens") = py::none(), py::arg("device") = "cpu",
        py::arg("report") = false,
        R"(Lightning indexer scores I[t,s] = sum_j w[t,j] ReLU(q_I[t,j] . k_I[s]) (Eq. 1), causal,
as dsa-score computes them.

q_index [B?, Lq, H_I, d_I], k_index [B?, Lk, d_I], weights [B?, Lq, H_I]; query row t sits at
position Lk - Lq + t. Returns float32 scores [B?, Lq, Lk], -inf where s > t (with report=True,
(scores, report)). precision: "f32", "bf16" or "fp8"; hadamard, ue8m0, raw_weights: the released
model's steps (docs/DESIGN.md section 1); compress_ratio, tokens: keys that are DeepSeek-V4's
compressed entries; device: "cpu", "cuda" or "auto".)");

  m.def("select", &select_op, py::arg("q_index") = py::none(), py::arg("k_index") = py::none(),
        py::arg("weights") = py::none(), py::kw_only(), py::arg("scores") = py::none(),
        py::arg("topk") = 2048, py::arg("precision") = "f32", py::arg("hadamard") = false,
        py::arg("ue8m0") = false, py::arg("raw_weights") = false, py::arg("query_block") = 16,
        py::arg("compress_ratio") = 1, py::arg("tokens") = py::none(), py::arg("device") = "cpu",
        py::arg("report") = false,
        R"(Top-k selection S_t = TopK_k({I[t,s] : s <= t}) (Eq. 2), as dsa-select computes it: fused
with the indexer (q_index, k_index, weights and score()'s keywords; never stores Lq x Lk), or
from a score matrix (scores=). Returns (indices int32 [B?, Lq, topk], scores float32 [B?, Lq,
topk]): descending score, equal scores lower position first, -1 padding (score -inf) where a
row sees fewer than topk keys.)");

  m.def("project_indexer", &project_op, py::arg("hidden"), py::arg("indexer_weights"),
        py::arg("prefix") = "",
        R"(q_index, k_index and weights projected from hidden states [B?, L, d_model] by the
indexer projections in a .safetensors file (wq_b.weight, wk.weight, k_norm.weight, k_norm.bias,
weights_proj.weight, under `prefix`; what dsa-fit writes): the tools' --hidden and
--indexer-weights. Returns (q_index, k_index, weights), float32.)");

  m.def(
      "attend",
      [](py::object q, py::object kv, py::object indices, py::object k, py::object v,
         std::optional<int64_t> d_v, bool dense, py::object scale, bool future_as_padding,
         std::optional<std::string> attention, py::object compressed, py::object sink,
         std::optional<int64_t> window, const std::string& kv_cache, const std::string& device,
         bool report) {
        return attend_op({q, kv, k, v, d_v, scale, attention, compressed, sink, window, kv_cache},
                         indices, dense, future_as_padding, device, report);
      },
      py::arg("q"), py::arg("kv") = py::none(), py::arg("indices") = py::none(), py::kw_only(),
      py::arg("k") = py::none(), py::arg("v") = py::none(), py::arg("d_v") = py::none(),
      py::arg("dense") = false, py::arg("scale") = py::none(), py::arg("future_as_padding") = false,
      py::arg("attention") = py::none(), py::arg("compressed") = py::none(),
      py::arg("sink") = py::none(), py::arg("window") = py::none(), py::arg("kv_cache") = "bf16",
      py::arg("device") = "cpu", py::arg("report") = false,
      R"(Attention over the selected entries (DSA), or dense causal attention (dense=True), as
dsa-attend computes it: o[t,h] = sum_{s in S_t} softmax_s(scale q[t,h] . k_s) v_s.

MQA (MLA latent): q [B?, Lq, H, d_qk], kv [B?, Lk, d_qk], values its first d_v columns (default
512). MHA/GQA: k= [B?, Lk, H_kv, d_qk], v= [B?, Lk, H_kv, d_v]. indices [B?, Lq, K] int32 or
int64, -1 padding. scale: None (d_qk^-0.5), "deepseek-v3.2" or a number. attention="csa",
"hca" or "swa": DeepSeek-V4's attention over kv's raw tokens (window=128) and the compressed
entries (compressed=), with the per-head sink= logits. kv_cache="fp8": over FlashMLA's fp8 cache
of kv (quantize_kv_cache); a uint8 kv [B?, Lk, 656] is such a cache already; with attention=,
over DeepSeek-V4's fp8 caches of kv and compressed (584 bytes a row; uint8 [.., 584] inputs are
such caches already, q 512 wide). Returns (out
float32 [B?, Lq, H, d_v], lse float32 [B?, Lq, H], natural log).)");

  m.def(
      "compare",
      [](py::object q, py::object kv, py::object q_index, py::object k_index, py::object weights,
         py::object indices, py::object k, py::object v, std::optional<int64_t> d_v,
         py::object topk, py::object needles, py::object scale, const std::string& precision,
         bool hadamard, bool ue8m0, bool raw_weights, int64_t query_block, bool future_as_padding,
         std::optional<std::string> attention, py::object compressed, py::object sink,
         std::optional<int64_t> window, std::optional<std::string> reference,
         const std::string& kv_cache, const std::string& device) {
        return compare_op({q, kv, k, v, d_v, scale, attention, compressed, sink, window, kv_cache},
                          q_index, k_index, weights, indices, topk, needles,
                          {precision, hadamard, ue8m0, raw_weights, query_block}, future_as_padding,
                          reference, device);
      },
      py::arg("q"), py::arg("kv") = py::none(), py::arg("q_index") = py::none(),
      py::arg("k_index") = py::none(), py::arg("weights") = py::none(), py::kw_only(),
      py::arg("indices") = py::none(), py::arg("k") = py::none(), py::arg("v") = py::none(),
      py::arg("d_v") = py::none(), py::arg("topk") = py::none(), py::arg("needles") = py::none(),
      py::arg("scale") = py::none(), py::arg("precision") = "f32", py::arg("hadamard") = false,
      py::arg("ue8m0") = false, py::arg("raw_weights") = false, py::arg("query_block") = 16,
      py::arg("future_as_padding") = false, py::arg("attention") = py::none(),
      py::arg("compressed") = py::none(), py::arg("sink") = py::none(),
      py::arg("window") = py::none(), py::arg("reference") = py::none(),
      py::arg("kv_cache") = "bf16", py::arg("device") = "cpu",
      R"(Fidelity of DSA against dense attention, as dsa-compare measures it: output error and
cosine, attention mass and oracle top-k recall, the indexer's KL losses (Eq. 3, 4), needle
recall, per k. Returns the report dsa-compare writes (schema dsa-compare/2) as a dict.

The attention inputs as attend()'s; the selection by the indexer (q_index, k_index, weights
and score()'s keywords; topk an int or an ascending list, default 2048, 512 with
attention="csa") or given (indices=). needles [N, 2]: (query position, key position) pairs.
attention="csa"/"hca" with reference="every-entry" or "dense". kv_cache="fp8": the sparse
attention over FlashMLA's fp8 cache of kv (with attention=, V4's fp8 caches of kv and
compressed), the reference over the values, and per k its kv_cache_loss against the same
selection over the values.)");

  m.def("quantize_kv_cache", &quantize_kv_cache_op, py::arg("kv"),
        R"(FlashMLA's fp8 cache of a latent cache kv [B?, L, 576]: uint8 [B?, L, 656], per token the
512 latent values as e4m3 codes, 4 float32 power-of-two scales (one per 128), the 64 rope values
in bfloat16 (docs/DESIGN.md section 7).)");
  m.def("dequantize_kv_cache", &dequantize_kv_cache_op, py::arg("cache"),
        R"(The rows an fp8 cache holds, float32 [B?, L, 576]: code x scale (exact in bfloat16), then
the rope values: what the attention reads from it.)");

  m.def("cost", &cost_op, py::kw_only(), py::arg("hardware") = "H800",
        py::arg("dense_model") = py::none(), py::arg("dsa_model") = py::none(),
        py::arg("compare_models") = py::none(), py::arg("baseline") = py::none(),
        py::arg("presets") = py::none(), py::arg("max_context") = 131072, py::arg("step") = 4096,
        py::arg("batch") = 64, py::arg("prefill_chunk") = 8192, py::arg("set") = py::none(),
        py::arg("calibrate") = false, py::arg("calibrate_seconds") = py::none(),
        py::arg("device") = py::none(), py::arg("calibrate_positions") = py::none(),
        py::arg("calibrate_tokens") = py::none(), py::arg("format") = "json",
        py::arg("plot") = py::none(),
        R"(Cost per million tokens at each context position, prefill and decode, dense MLA
(dense_model, default DeepSeek-V3.1-Terminus) against DSA (dsa_model, default
DeepSeek-V3.2-Exp), from a roofline of the hardware's rates (docs/DESIGN.md section 3); or
several models side by side (compare_models=[...], baseline=). Presets by name or a .json file;
set=["dsa.topk=1024"] or {"dsa.topk": 1024} overrides fields. calibrate=True measures on
device ("cpu": its rates, and its layers at calibrate_positions; "cuda": the models' layers
beside the roofline), calibrate_tokens rows or sequences per measured layer. Returns the report dsa-cost
writes (schema dsa-cost/3) as a dict, or with format="csv" its CSV text; plot=FILE.svg also
writes the plot.)");

  m.def("devices", &devices,
        "The devices usable now: [\"cpu\"], and \"cuda\" where this build "
        "has the CUDA backend and a GPU is there.");
  m.def("cuda_available", &dsa::cuda_available,
        "Whether device=\"cuda\" can run: the build has the CUDA backend and a GPU is there.");
  m.def("set_threads", &dsa::set_threads, py::arg("n"),
        "CPU threads for the library's OpenMP loops (the process's OpenMP setting, which "
        "importing torch may have changed); n <= 0 leaves it as it is.");
  m.def("threads", &dsa::max_threads, "CPU threads the library uses.");
  m.def("cpu_kernels", &dsa::cpu_kernels_name, "The CPU kernels in use: avx512, avx2 or generic.");
  m.def("available_cpu_kernels", &dsa::available_cpu_kernels,
        "The CPU kernels this CPU runs, widest first.");
  m.def("set_cpu_kernels", &dsa::set_cpu_kernels, py::arg("name"),
        "Use another set of CPU kernels (results differ only by rounding).");
  m.def(
      "_tensor_info",
      [](py::object object, const std::string& name) {
        bool copied = false;
        const dsa::Tensor t = to_tensor(object, name, &copied);
        return py::dict("data"_a = reinterpret_cast<std::uintptr_t>(t.data),
                        "dtype"_a = dsa::dtype_name(t.dtype), "shape"_a = t.shape,
                        "copied"_a = copied);
      },
      py::arg("object"), py::arg("name") = "x",
      "How an argument reaches the library: its data address, dtype, shape and whether it was "
      "copied (for tests).");
}
