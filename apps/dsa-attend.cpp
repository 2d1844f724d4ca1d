// dsa-attend: attention over the selected entries (DSA), or dense causal attention (--dense);
// with --attention, DeepSeek-V4's attention over a window and compressed entries with a sink.
#include <optional>

#include "common.hpp"
#include "dsa/attention.hpp"
#include "dsa/compressed_attention.hpp"
#include "dsa/device.hpp"
#include "dsa/error.hpp"
#include "dsa/io.hpp"
#include "ranks.hpp"

int main(int argc, char** argv) {
  CLI::App app(
      "Sparse attention o[t,h] = sum_{s in S_t} softmax(scale q[t,h] . k_s) v_s over "
      "the selected indices (or every s <= t with --dense): f32 [B?, Lq, H, d_v].",
      "dsa-attend");
  dsa::app::CommonOptions common;
  common.shares_rows = true;
  dsa::app::AttentionOptions attention;
  std::string indices_path, lse_path;
  bool dense = false;
  dsa::app::add_attention_options(app, attention);
  dsa::app::add_kv_cache_option(app, attention);
  std::string device_name = "cpu";
  dsa::app::add_device_option(app, device_name);
  auto* idx_opt = app.add_option("--indices", indices_path,
                                 "Selected indices [B?, Lq, K] (.npy, .safetensors or .jsonl)");
  auto* dense_opt = app.add_flag("--dense", dense, "Full causal attention (the baseline) instead");
  bool future_as_padding = false;
  app.add_flag("--future-as-padding", future_as_padding,
               "Entries beyond their query's position count as -1 padding (the released code's "
               "top-k of rows with fewer than K visible tokens), instead of an error")
      ->needs(idx_opt);
  idx_opt->excludes(dense_opt);
  app.add_option("--lse", lse_path, "Also write the log-sum-exp [B?, Lq, H] (natural log) to FILE");
  dsa::app::V4AttentionOptions v4;
  dsa::app::add_v4_attention_options(app, v4);
  dsa::app::add_common_options(app, common);

  return dsa::app::run(app, argc, argv, common, [&] {
    dsa::Stopwatch total;
    const dsa::app::Ranks& job = dsa::app::ranks();
    if (v4.attention.empty() && indices_path.empty() && !dense)
      dsa::bad_usage("give --indices, or --dense for full attention");
    if (v4.attention == "csa" && indices_path.empty() && !dense)
      dsa::bad_usage(
          "--attention csa: give --indices (the selection), or --dense for every "
          "visible entry");
    if (dense && (v4.attention == "hca" || v4.attention == "swa"))
      dsa::bad_usage("--attention {} has no selection to replace: drop --dense", v4.attention);
    dsa::app::check_single_stdin(
        {attention.q, attention.kv, attention.k, attention.v, indices_path});
    dsa::app::check_binary_output(common.output);
    if (!lse_path.empty()) dsa::app::check_binary_output(lse_path);
    dsa::app::check_single_stdout({common.output, lse_path, common.report});
    if (!lse_path.empty() && job.rank == 0) {
      dsa::naming("--lse", [&] { dsa::check_output(lse_path); });
    }

    nlohmann::json report = dsa::report_header("dsa-attend", argc, argv);
    report["schema"] = dsa::kAttendSchema;
    dsa::StageTimes times;
    // Rank 0 alone writes: its own rows as they come, then the other ranks' (ranks.hpp).
    std::optional<dsa::TensorWriter> out, lse;
    dsa::app::SharedOutput out_rows(
        [&](const void* data, std::size_t size) { out->write(data, size); });
    dsa::app::SharedOutput lse_rows(
        [&](const void* data, std::size_t size) { lse->write(data, size); });
    auto sink = [&](const dsa::AttentionBlock& block) {
      dsa::Stopwatch write;
      out_rows.add(block.out,
                   static_cast<std::size_t>(block.rows * block.heads * block.d_v) * sizeof(float));
      if (!lse_path.empty()) {
        lse_rows.add(block.lse, static_cast<std::size_t>(block.rows * block.heads) * sizeof(float));
      }
      times.add("write", write.seconds());
    };
    const auto open_outputs = [&](const dsa::Shape& out_shape, const dsa::Shape& lse_shape) {
      report["outputs"] = {{{"name", common.output}, {"shape", out_shape}, {"dtype", "f32"}}};
      if (!lse_path.empty())
        report["outputs"].push_back({{"name", lse_path}, {"shape", lse_shape}, {"dtype", "f32"}});
      if (job.rank != 0) return;
      out.emplace(common.output, dsa::DType::f32, out_shape);
      if (!lse_path.empty()) lse.emplace(lse_path, dsa::DType::f32, lse_shape);
    };
    const auto commit = [&] {
      out->commit();
      if (lse) lse->commit();
    };
    // Room for this rank's share of the outputs: `row_floats` of the output and `lse_floats` of
    // the log-sum-exp per row.
    const auto reserve_share = [&](dsa::RowRange rows, int64_t row_floats, int64_t lse_floats) {
      const auto share_rows = static_cast<std::size_t>(rows.end - rows.begin);
      out_rows.reserve(share_rows * static_cast<std::size_t>(row_floats) * sizeof(float));
      if (!lse_path.empty()) {
        lse_rows.reserve(share_rows * static_cast<std::size_t>(lse_floats) * sizeof(float));
      }
    };
    // After the work of an MPI job: rank 0 receives and writes the other ranks' rows and puts
    // their entries in the report's `ranks`. False on the other ranks, which are then done.
    const auto gather_shares = [&](const nlohmann::json& device, dsa::RowRange rows) {
      if (job.size == 1) return true;
      const nlohmann::json timings = dsa::timings_json(times, total.seconds());
      dsa::Stopwatch gather;
      out_rows.gather();
      if (!lse_path.empty()) lse_rows.gather();
      times.add("gather", gather.seconds());
      report["ranks"] = dsa::app::gather_rank_entries(device, rows, timings);
      return job.rank == 0;
    };

    if (!v4.attention.empty()) {  // DeepSeek-V4: window + compressed entries + sink
      if (future_as_padding) dsa::bad_usage("--future-as-padding is for V3.2 selections");
      dsa::app::V4AttentionTensors loaded;
      dsa::app::load_v4_attention(attention, v4, loaded);
      dsa::CompressedAttentionInputs inputs = loaded.attended();
      // One GPU per rank, as below.
      if (job.size > 1 && device_name != "cpu") dsa::use_local_gpu(job.local_rank);
      const dsa::DeviceChoice choice =
          dsa::naming("--device", [&] { return dsa::choose_device(device_name, inputs); });
      dsa::report_device(report, choice);
      for (const auto& t : loaded.tensors) report["inputs"].push_back(dsa::tensor_json(t));
      std::optional<dsa::TokenFile> tokens;
      if (inputs.kind == dsa::V4Attention::csa && !dense) {
        tokens = dsa::read_token_file(indices_path);
        dsa::validate_compressed_indices(inputs, tokens->indices, tokens->positions);
        report["inputs"].push_back(dsa::tensor_json(tokens->indices));
      } else if (!indices_path.empty()) {
        dsa::bad_usage(
            "--attention {} attends {}: it takes no --indices", v4.attention,
            inputs.kind == dsa::V4Attention::hca ? "every visible entry" : "the window alone");
      }
      const dsa::Tensor* selection = tokens ? &tokens->indices : nullptr;
      // Shares as the V3.2 path's below, balanced by the positions each row attends.
      const std::vector<dsa::RowRange> shares = dsa::balanced_rows(inputs, selection, job.size);
      inputs.rows = shares[job.rank];
      reserve_share(inputs.rows, inputs.heads * inputs.dim, inputs.heads);
      open_outputs(dsa::compressed_attention_output_shape(inputs),
                   dsa::compressed_attention_lse_shape(inputs));
      if (const int peer = dsa::app::ranks_ready()) throw dsa::app::PeerFailed{peer};
      dsa::compressed_attention(inputs, selection, loaded.scale.value, sink, &times, choice.device);
      if (!gather_shares(report["device"], inputs.rows)) return;
      commit();
      report.update(dsa::compressed_attention_report(inputs, dense, loaded.scale));
      dsa::app::finish_report(report, times, total.seconds(), common,
                              fmt::format("{} attention on {}", report["mode"].get<std::string>(),
                                          dsa::device_name(choice.device)));
      return;
    }

    dsa::app::AttentionTensors loaded;
    dsa::app::load_attention(attention, loaded);
    dsa::AttentionInputs inputs = loaded.fp8 ? loaded.fp8->inputs : loaded.inputs;
    // One GPU per rank: the host's ranks take its GPUs in turn (before any other CUDA call).
    if (job.size > 1 && device_name != "cpu") dsa::use_local_gpu(job.local_rank);
    const dsa::DeviceChoice choice =
        dsa::naming("--device", [&] { return dsa::choose_device(device_name, inputs); });
    const dsa::Device device = choice.device;
    dsa::report_device(report, choice);
    for (const auto& t : loaded.tensors) report["inputs"].push_back(dsa::tensor_json(t));
    std::optional<dsa::TokenFile> tokens;
    if (!dense) {
      tokens = dsa::read_token_file(indices_path);
      if (future_as_padding) {
        dsa::DroppedIndices kept = dsa::drop_future_indices(inputs, tokens->indices);
        tokens->indices = std::move(kept.indices);
        report["future_entries_dropped"] = kept.dropped;
      }
      dsa::validate_indices(inputs, tokens->indices, tokens->positions);
      report["inputs"].push_back(dsa::tensor_json(tokens->indices));
    }
    const float softmax_scale = loaded.scale.value;

    // An MPI job: each rank its share of the rows, balanced by their causal work; rank 0 writes
    // every share in row order, so the outputs are one process's to the byte.
    const std::vector<dsa::RowRange> shares =
        dsa::balanced_rows(inputs, dense ? nullptr : &tokens->indices, job.size);
    inputs.rows = shares[job.rank];
    reserve_share(inputs.rows, inputs.heads * inputs.d_v, inputs.heads);
    open_outputs(dsa::attention_output_shape(inputs), dsa::attention_lse_shape(inputs));
    if (const int peer = dsa::app::ranks_ready()) throw dsa::app::PeerFailed{peer};
    if (dense) {
      dsa::dense_attention(inputs, softmax_scale, sink, &times, device);
    } else {
      dsa::sparse_attention(inputs, tokens->indices, softmax_scale, sink, &times, device);
    }
    if (!gather_shares(report["device"], inputs.rows)) return;
    commit();

    report.update(dsa::attention_report(inputs, dense, loaded.scale));
    dsa::app::finish_report(
        report, times, total.seconds(), common,
        fmt::format("{} attention on {}", dense ? "dense" : "sparse", dsa::device_name(device)));
  });
}
