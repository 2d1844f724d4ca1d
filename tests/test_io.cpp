// Tensor and token files: round trips of every dtype and shape through .npy and .safetensors,
// hand-built headers of every .npy version, each malformed file rejected as bad input naming
// the file, outputs that appear only when committed, and the .jsonl selection format.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <mutex>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "dsa/error.hpp"
#include "dsa/io.hpp"
#include "dsa/precision.hpp"
#include "reference.hpp"
#include "temp_dir.hpp"

namespace dsa {
namespace {

namespace fs = std::filesystem;

// Passes when `action` throws dsa::Error with `code` and a message holding every needle.
::testing::AssertionResult fails_with(ExitCode code, const std::function<void()>& action,
                                      std::initializer_list<std::string_view> needles) {
  try {
    action();
  } catch (const Error& e) {
    const std::string message = e.what();
    if (e.code() != code) {
      return ::testing::AssertionFailure()
             << "exit code " << static_cast<int>(e.code()) << " instead of "
             << static_cast<int>(code) << ": " << message;
    }
    for (std::string_view needle : needles) {
      if (message.find(needle) == std::string::npos) {
        return ::testing::AssertionFailure() << "message lacks '" << needle << "': " << message;
      }
    }
    return ::testing::AssertionSuccess() << message;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "not a dsa::Error: " << e.what();
  }
  return ::testing::AssertionFailure() << "nothing was thrown";
}

::testing::AssertionResult fails_with_bad_input(const std::function<void()>& action,
                                                std::initializer_list<std::string_view> needles) {
  return fails_with(ExitCode::bad_input, action, needles);
}

std::string little_endian(uint64_t value, int bytes) {
  std::string out;
  for (int i = 0; i < bytes; ++i) out += static_cast<char>((value >> (8 * i)) & 0xff);
  return out;
}

// A .npy file built by hand: magic, version, header length (2 bytes for v1, 4 for v2/v3),
// the dict padded with spaces and a newline, then the data.
std::string npy_bytes(int major, const std::string& dict, const std::string& data) {
  const std::size_t prefix = major == 1 ? 10 : 12;
  std::string header = dict;
  header.append((64 - (prefix + header.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::string out = "\x93NUMPY";
  out += static_cast<char>(major);
  out += '\0';
  out += little_endian(header.size(), major == 1 ? 2 : 4);
  return out + header + data;
}

std::string npy_f32_bytes(const std::string& shape, std::size_t data_bytes) {
  return npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }",
                   std::string(data_bytes, '\0'));
}

// A .safetensors file built by hand: 8-byte little-endian header length, JSON, data.
std::string safetensors_bytes(const std::string& json, const std::string& data) {
  return little_endian(json.size(), 8) + json + data;
}

std::string f32_data(std::initializer_list<float> values) {
  std::string out(values.size() * sizeof(float), '\0');
  std::memcpy(out.data(), std::data(values), out.size());
  return out;
}

std::vector<std::byte> as_bytes(const std::string& s) {
  std::vector<std::byte> out(s.size());
  std::memcpy(out.data(), s.data(), s.size());
  return out;
}

// A tensor of `dtype` whose bytes are random (every bit pattern is a valid round trip).
Tensor random_bytes_tensor(DType dtype, Shape shape, std::mt19937_64& rng,
                           const std::string& name) {
  Tensor t = make_tensor(dtype, std::move(shape), name);
  auto* p = mutable_data<uint8_t>(t);
  for (std::size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<uint8_t>(rng());
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.data, b.data, a.nbytes()) == 0;
}

std::vector<int32_t> i32_values(const Tensor& t) {
  std::vector<int32_t> out(static_cast<std::size_t>(t.numel()));
  std::memcpy(out.data(), t.data, t.nbytes());
  return out;
}

class Io : public test::TempDirTest {
 protected:
  std::string write_file(const std::string& name, const std::string& bytes) const {
    std::ofstream(path(name), std::ios::binary) << bytes;
    return path(name);
  }
  std::vector<std::string> directory_entries() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir_)) names.push_back(entry.path().filename());
    std::sort(names.begin(), names.end());
    return names;
  }

  std::mt19937_64 rng_{20240917};
};

// --- round trips ------------------------------------------------------------------------------

const DType kNpyDTypes[] = {DType::f32, DType::f64, DType::f16, DType::bf16,
                            DType::i32, DType::i64, DType::u8};
const Shape kShapes[] = {{}, {0}, {1}, {3, 4}, {2, 3, 4, 5}};

TEST_F(Io, NpyRoundTripsEveryDTypeAndShape) {
  for (DType dtype : kNpyDTypes) {
    for (const Shape& shape : kShapes) {
      SCOPED_TRACE(dtype_name(dtype) + " " + shape_string(shape));
      const Tensor written = random_bytes_tensor(dtype, shape, rng_, "x");
      const std::string file = path("x.npy");
      write_tensor(file, written);
      const Tensor read = read_tensor(file);
      EXPECT_EQ(read.dtype, dtype);
      EXPECT_EQ(read.shape, shape);
      EXPECT_EQ(read.name, file);
      EXPECT_TRUE(same_bytes(read, written));
      // The data starts on a 64-byte boundary, as NumPy lays it out.
      EXPECT_EQ(fs::file_size(file) % 64, written.nbytes() % 64);
    }
  }
}

TEST_F(Io, SafetensorsRoundTripsEveryDTypeAndShape) {
  for (DType dtype : kNpyDTypes) {
    for (const Shape& shape : kShapes) {
      SCOPED_TRACE(dtype_name(dtype) + " " + shape_string(shape));
      const Tensor written = random_bytes_tensor(dtype, shape, rng_, "x");
      const std::string file = path("x.safetensors");
      write_tensor(file, written);
      const Tensor read = read_tensor(file);
      EXPECT_EQ(read.dtype, dtype);
      EXPECT_EQ(read.shape, shape);
      EXPECT_TRUE(same_bytes(read, written));
    }
  }
}

TEST_F(Io, F32ValuesSurviveNpyExactly) {
  const Tensor written = test::random_tensor({7, 5}, rng_);
  write_tensor(path("q.npy"), written);
  EXPECT_EQ(to_f32(read_tensor(path("q.npy"))), to_f32(written));
}

TEST_F(Io, SingleSafetensorIsCalledTensorAndNeedsNoName) {
  const Tensor written = random_bytes_tensor(DType::f32, {3, 4}, rng_, "ignored");
  const std::string file = path("one.safetensors");
  write_tensor(file, written);
  EXPECT_EQ(safetensors_names(file), std::vector<std::string>{"tensor"});
  const Tensor unnamed = read_tensor(file);
  EXPECT_EQ(unnamed.name, file + ":tensor");
  EXPECT_TRUE(same_bytes(unnamed, written));
  EXPECT_TRUE(same_bytes(read_tensor(file + ":tensor"), written));
}

TEST_F(Io, WriteTensorToNamedSafetensorsSpec) {
  const Tensor written = random_bytes_tensor(DType::bf16, {2, 3}, rng_, "x");
  const std::string file = path("named.safetensors");
  write_tensor(file + ":k_index", written);
  EXPECT_EQ(safetensors_names(file), std::vector<std::string>{"k_index"});
  const Tensor read = read_tensor(file + ":k_index");
  EXPECT_EQ(read.name, file + ":k_index");
  EXPECT_EQ(read.dtype, DType::bf16);
  EXPECT_TRUE(same_bytes(read, written));
}

TEST_F(Io, SeveralSafetensorsSelectedByName) {
  const std::vector<Tensor> tensors = {random_bytes_tensor(DType::f32, {4, 2}, rng_, "zeta"),
                                       random_bytes_tensor(DType::i64, {3}, rng_, "alpha"),
                                       random_bytes_tensor(DType::u8, {0, 5}, rng_, "empty"),
                                       random_bytes_tensor(DType::f16, {}, rng_, "mid")};
  const std::string file = path("many.safetensors");
  write_safetensors(file, tensors);
  EXPECT_EQ(safetensors_names(file), (std::vector<std::string>{"zeta", "alpha", "empty", "mid"}));
  for (const Tensor& written : tensors) {
    SCOPED_TRACE(written.name);
    const Tensor read = read_tensor(file + ":" + written.name);
    EXPECT_EQ(read.name, file + ":" + written.name);
    EXPECT_EQ(read.dtype, written.dtype);
    EXPECT_EQ(read.shape, written.shape);
    EXPECT_TRUE(same_bytes(read, written));
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(read.data) % dtype_size(read.dtype), 0u);
  }
}

TEST_F(Io, SeveralSafetensorsNeedANameAndTheErrorListsThem) {
  const std::string file = path("two.safetensors");
  write_safetensors(file, {random_bytes_tensor(DType::f32, {2}, rng_, "q"),
                           random_bytes_tensor(DType::f32, {2}, rng_, "k_index")});
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(file); },
                                   {file, "2 tensors", "q", "k_index", file + ":NAME"}));
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(file + ":v"); },
                                   {file, "no tensor 'v'", "q, k_index"}));
}

TEST_F(Io, SafetensorsNamesMustBeDistinct) {
  const std::string file = path("dup.safetensors");
  EXPECT_TRUE(fails_with(ExitCode::usage,
                         [&] {
                           write_safetensors(file,
                                             {random_bytes_tensor(DType::f32, {2}, rng_, "q"),
                                              random_bytes_tensor(DType::f32, {3}, rng_, "q")});
                         },
                         {file, "'q'"}));
  EXPECT_FALSE(fs::exists(file));
}

TEST_F(Io, NpyFileHasNoNamedTensor) {
  const std::string file = path("x.npy");
  write_tensor(file, make_tensor(DType::f32, {2}));
  // A name after a colon is only split off for .safetensors paths.
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(file + ":q"); }, {file + ":q"}));
  const std::string disguised = path("x.safetensors");
  fs::copy_file(file, disguised);
  EXPECT_TRUE(
      fails_with_bad_input([&] { read_tensor(disguised + ":q"); }, {disguised, ".npy", "'q'"}));
  EXPECT_EQ(read_tensor(disguised).shape, Shape{2});
}

TEST_F(Io, F8E4M3RoundTripsThroughSafetensorsOnly) {
  Tensor written = make_tensor(DType::f8_e4m3, {16, 16}, "fp8");
  for (int code = 0; code < 256; ++code)
    mutable_data<uint8_t>(written)[code] = static_cast<uint8_t>(code);
  const std::string file = path("fp8.safetensors");
  write_tensor(file, written);
  const Tensor read = read_tensor(file);
  EXPECT_EQ(read.dtype, DType::f8_e4m3);
  EXPECT_EQ(read.shape, (Shape{16, 16}));
  EXPECT_TRUE(same_bytes(read, written));
  const std::vector<float> values = to_f32(read);
  EXPECT_EQ(values[0x38], 1.0f);
  EXPECT_EQ(values[0x7e], kE4M3Max);
  EXPECT_TRUE(std::isnan(values[0x7f]));

  EXPECT_TRUE(fails_with(ExitCode::usage, [&] { write_tensor(path("fp8.npy"), written); },
                         {"f8_e4m3", ".safetensors"}));
  EXPECT_EQ(directory_entries(), std::vector<std::string>{"fp8.safetensors"});
}

TEST_F(Io, ParseSpecsAndFormats) {
  EXPECT_EQ(parse_tensor_spec("a/b.safetensors:k_index").path, "a/b.safetensors");
  EXPECT_EQ(parse_tensor_spec("a/b.safetensors:k_index").tensor, "k_index");
  EXPECT_EQ(parse_tensor_spec("a/b.safetensors").tensor, "");
  EXPECT_EQ(parse_tensor_spec("c:/x.npy").path, "c:/x.npy");
  EXPECT_EQ(parse_tensor_spec("c:/x.npy").tensor, "");
  EXPECT_EQ(format_of("x.safetensors"), FileFormat::safetensors);
  EXPECT_EQ(format_of("x.npy"), FileFormat::npy);
  EXPECT_EQ(format_of("-"), FileFormat::npy);
}

// --- in-memory parsers --------------------------------------------------------------------------

TEST_F(Io, ParseNpyInMemoryPointsIntoTheBytes) {
  const auto bytes = std::make_shared<std::vector<std::byte>>(as_bytes(npy_bytes(
      1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", f32_data({1, 2, 3}))));
  const Tensor t = parse_npy(bytes->data(), bytes->size(), "memory", bytes);
  EXPECT_EQ(t.name, "memory");
  EXPECT_EQ(t.shape, Shape{3});
  EXPECT_EQ(t.data, bytes->data() + bytes->size() - 12);
  EXPECT_EQ(to_f32(t), (std::vector<float>{1, 2, 3}));
  EXPECT_EQ(t.storage.get(), bytes.get());
}

TEST_F(Io, ParseSafetensorsInMemoryPointsIntoTheBytes) {
  const std::string json =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"I32","shape":[1],"data_offsets":[8,12]}})";
  const auto bytes = std::make_shared<std::vector<std::byte>>(
      as_bytes(safetensors_bytes(json, f32_data({5, 6}) + little_endian(7, 4))));
  const Tensor a = parse_safetensors(bytes->data(), bytes->size(), "mem", "a", bytes);
  EXPECT_EQ(a.name, "mem:a");
  EXPECT_EQ(a.data, bytes->data() + 8 + json.size());
  EXPECT_EQ(to_f32(a), (std::vector<float>{5, 6}));
  const Tensor b = parse_safetensors(bytes->data(), bytes->size(), "mem", "b", bytes);
  EXPECT_EQ(b.dtype, DType::i32);
  EXPECT_EQ(i32_values(b), std::vector<int32_t>{7});
  EXPECT_TRUE(fails_with_bad_input(
      [&] { parse_safetensors(bytes->data(), bytes->size(), "mem", "", bytes); }, {"mem", "a, b"}));
}

// --- hand-built .npy headers ---------------------------------------------------------------------

TEST_F(Io, ReadsNpyVersion2And3Headers) {
  for (int major : {2, 3}) {
    SCOPED_TRACE(major);
    const std::string file = write_file(
        "v.npy", npy_bytes(major, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }",
                           f32_data({1, 2, 3, 4})));
    const Tensor t = read_tensor(file);
    EXPECT_EQ(t.shape, (Shape{2, 2}));
    EXPECT_EQ(to_f32(t), (std::vector<float>{1, 2, 3, 4}));
  }
}

TEST_F(Io, ReadsNpyHeaderWithExtraSpacesAndPython2Longs) {
  const std::string spaced = write_file(
      "spaced.npy",
      npy_bytes(1, "{ 'descr' : '<f4' ,  'fortran_order' : False ,\t'shape' : ( 5 , ) , }",
                f32_data({1, 2, 3, 4, 5})));
  EXPECT_EQ(read_tensor(spaced).shape, Shape{5});
  const std::string trailing = write_file(
      "trailing.npy", npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (5,)}",
                                f32_data({1, 2, 3, 4, 5})));
  EXPECT_EQ(read_tensor(trailing).shape, Shape{5});
  const std::string longs = write_file(
      "longs.npy", npy_bytes(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (2L, 3L), }",
                             std::string(48, '\0')));
  const Tensor t = read_tensor(longs);
  EXPECT_EQ(t.dtype, DType::i64);
  EXPECT_EQ(t.shape, (Shape{2, 3}));
  const std::string reordered = write_file(
      "reordered.npy", npy_bytes(1, R"({"shape": (1,), "fortran_order": True, "descr": "|u1"})",
                                 std::string(1, '\x7f')));
  const Tensor u = read_tensor(reordered);  // Fortran order is the same layout in one dimension
  EXPECT_EQ(u.dtype, DType::u8);
  EXPECT_EQ(static_cast<uint8_t>(u.data[0]), 0x7f);
}

TEST_F(Io, ReadsBfloat16NpyAsMlDtypesWritesIt) {
  std::string data = little_endian(f32_to_bf16(1.5f), 2) + little_endian(f32_to_bf16(-2.0f), 2);
  const std::string file = write_file(
      "bf16.npy", npy_bytes(1, "{'descr': '<V2', 'fortran_order': False, 'shape': (2,), }", data));
  const Tensor t = read_tensor(file);
  EXPECT_EQ(t.dtype, DType::bf16);
  EXPECT_EQ(to_f32(t), (std::vector<float>{1.5f, -2.0f}));
}

// --- malformed files ---------------------------------------------------------------------------

TEST_F(Io, CheckOutputFailsAsTheWriteWouldAndLeavesNothing) {
  check_output("-");
  check_output(path("fresh.npy"));
  check_output(path("fresh.safetensors") + ":name");
  check_output("/dev/null");  // a device: checked, not replaced
  const auto code_of = [](const std::string& spec) {
    try {
      check_output(spec);
    } catch (const Error& e) {
      return e.code();
    }
    return ExitCode::ok;
  };
  EXPECT_EQ(code_of(path("missing/x.npy")), ExitCode::runtime);
  EXPECT_EQ(code_of(path("missing/x.safetensors") + ":t"), ExitCode::runtime);
  EXPECT_EQ(code_of(dir_.string()), ExitCode::usage);  // a directory
  fs::create_directory(path("ro"));
  fs::permissions(path("ro"), fs::perms::owner_read | fs::perms::owner_exec);
  if (::geteuid() != 0)
    EXPECT_EQ(code_of(path("ro/x.npy")), ExitCode::runtime);  // root writes anyway
  fs::permissions(path("ro"), fs::perms::owner_all);
  EXPECT_EQ(directory_entries(), std::vector<std::string>{"ro"});  // no probe left behind
  EXPECT_TRUE(fs::is_empty(path("ro")));
}

TEST_F(Io, MissingEmptyAndDirectoryInputsAreBadInput) {
  const std::string missing = path("missing.npy");
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(missing); }, {missing}));
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(missing + ".safetensors:x"); }, {missing}));
  const std::string empty = write_file("empty.npy", "");
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(empty); }, {empty, "empty"}));
  EXPECT_TRUE(
      fails_with_bad_input([&] { read_tensor(dir_.string()); }, {dir_.string(), "directory"}));
  const std::string text = write_file("text.npy", "hello, world\n");
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(text); }, {text, "neither"}));
  const std::string tiny = write_file("tiny.npy", "ab");
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(tiny); }, {tiny}));
}

TEST_F(Io, TruncatedNpyIsBadInput) {
  const std::string whole = npy_bytes(
      1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }", std::string(48, '\1'));
  const std::string magic_only = write_file("magic.npy", whole.substr(0, 8));
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(magic_only); }, {magic_only, "truncated"}));
  const std::string header_cut = write_file("header.npy", whole.substr(0, 40));
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(header_cut); }, {header_cut, "truncated"}));
  const std::string v2_prefix_cut = write_file("v2.npy", std::string("\x93NUMPY\x02\0\x10\0", 10));
  EXPECT_TRUE(
      fails_with_bad_input([&] { read_tensor(v2_prefix_cut); }, {v2_prefix_cut, "truncated"}));
  const std::string data_cut = write_file("data.npy", whole.substr(0, whole.size() - 4));
  EXPECT_TRUE(
      fails_with_bad_input([&] { read_tensor(data_cut); }, {data_cut, "48 bytes", "44 bytes"}));
  const std::string no_data = write_file("nodata.npy", whole.substr(0, whole.size() - 48));
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(no_data); }, {no_data, "holds 0 bytes"}));
}

TEST_F(Io, NpyHeaderThatLiesAboutTheDataIsBadInput) {
  const std::string too_few = write_file("few.npy", npy_f32_bytes("(3,)", 8));
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(too_few); },
                                   {too_few, "f32 [3]", "12 bytes", "8 bytes"}));
  const std::string too_many = write_file("many.npy", npy_f32_bytes("(3,)", 16));
  EXPECT_TRUE(
      fails_with_bad_input([&] { read_tensor(too_many); }, {too_many, "12 bytes", "16 bytes"}));
  const std::string empty_shape = write_file("zero.npy", npy_f32_bytes("(0, 7)", 4));
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(empty_shape); }, {empty_shape, "[0, 7]"}));
  const std::string huge = write_file("huge.npy", npy_f32_bytes("(9223372036854775807, 2)", 16));
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(huge); }, {huge}));
  const std::string overflow =
      write_file("overflow.npy", npy_f32_bytes("(4294967296, 4294967296)", 16));
  EXPECT_TRUE(
      fails_with_bad_input([&] { read_tensor(overflow); }, {overflow, "too many elements"}));
  const std::string digits = write_file("digits.npy", npy_f32_bytes("(99999999999999999999,)", 16));
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(digits); }, {digits, "too large"}));
}

TEST_F(Io, UnsupportedNpyDTypesAreBadInput) {
  const auto with_descr = [&](const std::string& name, const std::string& descr) {
    return write_file(
        name, npy_bytes(1, "{'descr': " + descr + ", 'fortran_order': False, 'shape': (2,), }",
                        std::string(16, '\0')));
  };
  const std::string complex = with_descr("complex.npy", "'<c8'");
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(complex); }, {complex, "'<c8'"}));
  const std::string object = with_descr("object.npy", "'|O'");
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(object); }, {object, "'|O'"}));
  const std::string structured = with_descr("structured.npy", "[('a', '<f4'), ('b', '<f4')]");
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(structured); }, {structured, "structured"}));
  const std::string big_endian = with_descr("big.npy", "'>f4'");
  EXPECT_TRUE(
      fails_with_bad_input([&] { read_tensor(big_endian); }, {big_endian, "big-endian", "'>f4'"}));
  const std::string int8 = with_descr("int8.npy", "'|i1'");
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(int8); }, {int8, "'|i1'"}));
}

TEST_F(Io, FortranOrderIsBadInputInTwoDimensions) {
  const std::string file = write_file(
      "fortran.npy", npy_bytes(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
                               std::string(24, '\0')));
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(file); }, {file, "Fortran"}));
}

TEST_F(Io, NpyMagicVersionAndHeaderSizeAreChecked) {
  std::string bad_magic = npy_f32_bytes("(2,)", 8);
  bad_magic[5] = 'Z';
  const std::string magic = write_file("magic.npy", bad_magic);
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(magic); }, {magic}));
  const auto bytes = as_bytes(bad_magic);
  EXPECT_TRUE(
      fails_with_bad_input([&] { parse_npy(bytes.data(), bytes.size(), "mem.npy", nullptr); },
                           {"mem.npy", "bad magic"}));

  for (int major : {0, 4}) {
    std::string versioned = npy_f32_bytes("(2,)", 8);
    versioned[6] = static_cast<char>(major);
    const std::string file = write_file("version.npy", versioned);
    EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(file); },
                                     {file, "version " + std::to_string(major)}));
  }

  // A v2 header length of 2 MiB is refused before anything is read.
  const std::string huge = write_file(
      "huge.npy", std::string("\x93NUMPY\x02\0", 8) + little_endian(2u << 20, 4) + "{'descr'");
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(huge); }, {huge, "larger than"}));
}

TEST_F(Io, MalformedNpyHeaderDictIsBadInput) {
  const std::vector<std::string> dicts = {
      "{'descr': '<f4', 'shape': (2,), }",                                      // no fortran_order
      "{'fortran_order': False, 'shape': (2,), }",                              // no descr
      "{'descr': '<f4', 'fortran_order': False, }",                             // no shape
      "garbage",                                                                // not a dict
      "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2,), }",              // not a bool
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2 2), }",             // no comma
      "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }",             // negative
      "{'descr': '<f4', 'fortran_order': False, 'shape': [2], }",               // not a tuple
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'extra': 1, }",  // unknown key
      "{'descr': '<f4' 'fortran_order': False, 'shape': (2,), }",               // missing comma
      "{'descr': '<f4, 'fortran_order': False, 'shape': (2,), }",               // broken quote
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2,",                  // cut short
      "{descr: '<f4', fortran_order: False, shape: (2,)}",                      // unquoted keys
  };
  for (std::size_t i = 0; i < dicts.size(); ++i) {
    SCOPED_TRACE(dicts[i]);
    const std::string file = write_file("dict" + std::to_string(i) + ".npy",
                                        npy_bytes(1, dicts[i], std::string(8, '\0')));
    EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(file); }, {file, "malformed .npy header"}));
  }
  std::string many_dims = "(";
  for (int i = 0; i < 33; ++i) many_dims += "1, ";
  many_dims += ")";
  const std::string file = write_file("dims.npy", npy_f32_bytes(many_dims, 4));
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(file); }, {file, "32 dimensions"}));
}

TEST_F(Io, MalformedSafetensorsAreBadInput) {
  const std::string data16(16, '\0');
  struct Case {
    std::string json;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {R"({"a": {"dtype": "F32", "shape": [2)", "not valid JSON"},
      {R"({"a": 5})", "entry needs"},
      {R"({"a": {"dtype": "F32", "shape": [4]}})", "entry needs"},
      {R"({"a": {"dtype": "F32", "data_offsets": [0, 16]}})", "entry needs"},
      {R"({"a": {"dtype": 7, "shape": [4], "data_offsets": [0, 16]}})", "entry needs"},
      {R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0]}})", "entry needs"},
      {R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})", "outside"},
      {R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 100]}})", "outside"},
      {R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]}})", "outside"},
      {R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}})", "non-negative"},
      {R"({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}})", "needs 16 bytes"},
      {R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}})", "needs 8 bytes"},
      {R"({"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 16]}})",
       "unsupported dtype 'F4'"},
      {R"({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 16]}})", "non-negative"},
      {R"({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 16]}})", "non-negative"},
      {R"({"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 16]}})",
       "too many elements"},
      {R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
       R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
       "'a' and 'b' overlap"},
  };
  for (std::size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].json);
    const std::string file = write_file("bad" + std::to_string(i) + ".safetensors",
                                        safetensors_bytes(cases[i].json, data16));
    EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(file + ":a"); }, {file, cases[i].needle}));
  }
  // One bad entry fails the whole file, even when another tensor is asked for.
  const std::string bad_second = write_file(
      "second.safetensors",
      safetensors_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                        R"( "b": {"dtype": "F4", "shape": [2], "data_offsets": [8, 16]}})",
                        data16));
  EXPECT_TRUE(
      fails_with_bad_input([&] { read_tensor(bad_second + ":a"); }, {bad_second + ":b", "'F4'"}));
}

TEST_F(Io, EmptySafetensorAtAnotherTensorsOffsetIsNoOverlap) {
  const std::string file = write_file(
      "empty.safetensors",
      safetensors_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                        R"( "e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})",
                        f32_data({1, 2})));
  EXPECT_EQ(to_f32(read_tensor(file + ":a")), (std::vector<float>{1, 2}));
  EXPECT_EQ(read_tensor(file + ":e").shape, Shape{0});
}

TEST_F(Io, SafetensorsHeaderFramingIsChecked) {
  const auto non_object = as_bytes(safetensors_bytes("[1, 2]", ""));
  EXPECT_TRUE(fails_with_bad_input(
      [&] {
        parse_safetensors(non_object.data(), non_object.size(), "arr.safetensors", "", nullptr);
      },
      {"arr.safetensors", "not a JSON object"}));
  const std::string array_file = write_file("arr.safetensors", safetensors_bytes("[1, 2]", ""));
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(array_file); }, {array_file}));

  const std::string huge = write_file("huge.safetensors", little_endian(200ull << 20, 8) + "{}");
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(huge); }, {huge, "larger than"}));
  const std::string header_cut = write_file("cut.safetensors", little_endian(100, 8) + "{\"a\": {");
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(header_cut); }, {header_cut, "truncated"}));
  const auto short_bytes = as_bytes("\x02\0\0");
  EXPECT_TRUE(fails_with_bad_input(
      [&] {
        parse_safetensors(short_bytes.data(), short_bytes.size(), "short.safetensors", "", nullptr);
      },
      {"short.safetensors", "truncated"}));
  const std::string data_cut = write_file(
      "data.safetensors",
      safetensors_bytes(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})",
                        std::string(12, '\0')));
  EXPECT_TRUE(
      fails_with_bad_input([&] { read_tensor(data_cut); }, {data_cut, "outside the 12 bytes"}));
  const std::string no_tensors = write_file("none.safetensors", safetensors_bytes("{}", ""));
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(no_tensors); }, {no_tensors, "0 tensors"}));
  EXPECT_TRUE(fails_with_bad_input([&] { safetensors_names(path("absent.safetensors")); },
                                   {path("absent.safetensors")}));
}

// --- streams -------------------------------------------------------------------------------------

// A pipe, read as /dev/fd/N, whose writer sends `bytes` (few enough for the pipe's buffer) and
// then, if `held_open`, keeps the stream open, as an endless one would, until the reader is done
// or 10 seconds pass: a reader that waits for more than it should is caught by the latter.
class PipeStream {
 public:
  PipeStream(std::string bytes, bool held_open) {
    int ends[2];
    if (::pipe(ends) != 0) throw std::runtime_error("pipe failed");
    read_end_ = ends[0];
    writer_ = std::thread([this, bytes = std::move(bytes), held_open, write_end = ends[1]] {
      for (std::size_t sent = 0; sent < bytes.size();) {
        const ssize_t n = ::write(write_end, bytes.data() + sent, bytes.size() - sent);
        if (n <= 0) break;
        sent += static_cast<std::size_t>(n);
      }
      if (held_open) {
        std::unique_lock<std::mutex> lock(mutex_);
        gave_up_ = !reader_done_changed_.wait_for(lock, std::chrono::seconds(10),
                                                  [this] { return reader_done_; });
      }
      ::close(write_end);
    });
  }
  PipeStream(const PipeStream&) = delete;
  PipeStream& operator=(const PipeStream&) = delete;
  ~PipeStream() { finish(); }

  std::string path() const { return "/dev/fd/" + std::to_string(read_end_); }

  // Ends the stream; false when the writer had given up waiting for the reader.
  bool reader_was_in_time() {
    finish();
    return !gave_up_;
  }

 private:
  void finish() {
    if (!writer_.joinable()) return;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      reader_done_ = true;
    }
    reader_done_changed_.notify_one();
    writer_.join();
    ::close(read_end_);
  }

  int read_end_ = -1;
  std::thread writer_;
  std::mutex mutex_;
  std::condition_variable reader_done_changed_;
  bool reader_done_ = false;
  bool gave_up_ = false;
};

TEST_F(Io, StreamsOfEitherFormatAreRead) {
  const std::string npy = npy_bytes(3, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
                                    f32_data({1, 2, 3}));
  PipeStream npy_stream(npy, false);
  EXPECT_EQ(to_f32(read_tensor(npy_stream.path())), (std::vector<float>{1, 2, 3}));
  const std::string safetensors = safetensors_bytes(
      R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", f32_data({5, 6}));
  PipeStream safetensors_stream(safetensors, false);
  const Tensor a = read_tensor(safetensors_stream.path());
  EXPECT_EQ(a.name, safetensors_stream.path() + ":a");
  EXPECT_EQ(to_f32(a), (std::vector<float>{5, 6}));
  PipeStream names_stream(safetensors, false);
  EXPECT_EQ(safetensors_names(names_stream.path()), std::vector<std::string>{"a"});
}

TEST_F(Io, StreamCutShortGetsTheMessagesOfAFileCutShort) {
  const std::string whole = npy_f32_bytes("(3, 4)", 48);
  PipeStream empty("", false);
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(empty.path()); }, {"is empty"}));
  PipeStream header_cut(whole.substr(0, 40), false);
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(header_cut.path()); },
                                   {header_cut.path(), "truncated .npy header"}));
  PipeStream data_cut(whole.substr(0, whole.size() - 4), false);
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(data_cut.path()); },
                                   {data_cut.path(), "48 bytes", "but the file holds 44 bytes"}));
  PipeStream safetensors_cut(
      safetensors_bytes(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})",
                        std::string(12, '\0')),
      false);
  EXPECT_TRUE(fails_with_bad_input([&] { read_tensor(safetensors_cut.path()); },
                                   {safetensors_cut.path(), "outside the 12 bytes"}));
}

TEST_F(Io, StreamIsCheckedBeforeItEnds) {
  // Each stream stays open after its bytes: every verdict must come from what was read so far.
  const std::string npy = npy_f32_bytes("(3,)", 12);
  const std::string safetensors = safetensors_bytes(
      R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", f32_data({5, 6}));
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {std::string(64, '\0'), {"neither a .npy nor a .safetensors file"}},
      {"hello, world\n", {"neither a .npy nor a .safetensors file"}},
      {npy + "more", {"the stream holds more than the 12 bytes of data its header declares"}},
      {safetensors + npy, {"the stream holds more than the 8 bytes of data its header declares"}},
      {std::string("\x93NUMPY\x02\0", 8) + little_endian(2u << 20, 4) + "{'descr'",
       {".npy header of 2097152 bytes is larger than the 1048576 allowed"}},
      {little_endian(200ull << 20, 8) + "{}", {".safetensors header of", "larger than"}},
      {npy_bytes(1, "{'descr': '<f4', 'shape': (2,), }", ""), {"malformed .npy header"}},
      {npy_f32_bytes("(1125899906842624,)", 0), {"bytes of memory a stream is read into"}},
      {safetensors_bytes(R"({"a": {"dtype": "U8", "shape": [1152921504606846976], "data_offsets": )"
                         R"([0, 1152921504606846976]}})",
                         ""),
       {"header declares 1152921504606846976 bytes of data"}},
  };
  for (const auto& [bytes, needles] : cases) {
    SCOPED_TRACE(needles.front());
    PipeStream stream(bytes, true);
    try {
      read_tensor(stream.path());
      ADD_FAILURE() << "read";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ExitCode::bad_input);
      const std::string message = e.what();
      EXPECT_EQ(message.rfind(stream.path(), 0), 0u) << message;
      for (const auto& needle : needles)
        EXPECT_NE(message.find(needle), std::string::npos) << message;
    }
    EXPECT_TRUE(stream.reader_was_in_time()) << "the reader waited for the stream to end";
  }
}

// --- outputs -----------------------------------------------------------------------------------

TEST_F(Io, UncommittedOutputLeavesNothingBehind) {
  {
    OutputFile file(path("out.bin"));
    file.write("partial");
    EXPECT_EQ(directory_entries().size(), 1u);  // the temporary file, under another name
    EXPECT_FALSE(fs::exists(path("out.bin")));
  }
  EXPECT_TRUE(directory_entries().empty());
}

TEST_F(Io, CommitCreatesTheFileWithUmaskPermissions) {
  {
    OutputFile file(path("out.txt"));
    file.write("hello ");
    file.write(std::string_view("world"));
    file.commit();
  }
  EXPECT_EQ(directory_entries(), std::vector<std::string>{"out.txt"});
  std::ifstream in(path("out.txt"));
  std::string text;
  std::getline(in, text);
  EXPECT_EQ(text, "hello world");
  const mode_t mask = ::umask(0);
  ::umask(mask);
  struct stat st {};
  ASSERT_EQ(::stat(path("out.txt").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0666 & ~mask);
}

TEST_F(Io, CommitReplacesAnExistingFile) {
  write_file("out.txt", "old contents that are longer");
  OutputFile file(path("out.txt"));
  file.write("new");
  file.commit();
  std::ifstream in(path("out.txt"));
  std::string text;
  std::getline(in, text);
  EXPECT_EQ(text, "new");
}

TEST_F(Io, OutputIntoMissingDirectoryIsARuntimeError) {
  const std::string file = path("no/such/dir/out.npy");
  EXPECT_TRUE(fails_with(ExitCode::runtime, [&] { OutputFile out(file); }, {file}));
  EXPECT_TRUE(fails_with(ExitCode::runtime,
                         [&] { write_tensor(file, make_tensor(DType::f32, {2})); }, {file}));
  EXPECT_TRUE(directory_entries().empty());
  EXPECT_TRUE(fails_with(ExitCode::usage, [&] { OutputFile out(path("dir/")); }, {"directory"}));
}

TEST_F(Io, TensorWriterStreamsInPieces) {
  const Tensor whole = random_bytes_tensor(DType::f32, {5, 7}, rng_, "x");
  for (const std::string name : {"streamed.npy", "streamed.safetensors"}) {
    SCOPED_TRACE(name);
    TensorWriter writer(path(name), DType::f32, {5, 7});
    for (int64_t row = 0; row < 5; ++row) writer.write(whole.data + row * 7 * 4, 7 * 4);
    EXPECT_FALSE(fs::exists(path(name)));
    writer.commit();
    EXPECT_TRUE(same_bytes(read_tensor(path(name)), whole));
  }
  TensorWriter empty(path("empty.npy"), DType::i32, {0, 3});
  empty.commit();
  EXPECT_EQ(read_tensor(path("empty.npy")).shape, (Shape{0, 3}));
}

TEST_F(Io, TensorWriterCommitFailsWhenBytesAreMissingOrExtra) {
  const Tensor whole = random_bytes_tensor(DType::f64, {4}, rng_, "x");
  const std::string file = path("short.npy");
  EXPECT_TRUE(fails_with(ExitCode::runtime,
                         [&] {
                           TensorWriter writer(file, DType::f64, {4});
                           writer.write(whole.data, 24);
                           writer.commit();
                         },
                         {file, "24 of 32 bytes"}));
  EXPECT_TRUE(fails_with(ExitCode::runtime,
                         [&] {
                           TensorWriter writer(file, DType::f64, {4});
                           writer.write(whole.data, 32);
                           writer.write(whole.data, 1);
                         },
                         {file, "more data"}));
  EXPECT_TRUE(directory_entries().empty());
}

// --- token files ---------------------------------------------------------------------------------

TEST_F(Io, JsonlTokensArePaddedToTheLongestRow) {
  const std::string file = write_file("sel.jsonl",
                                      "{\"t\":5,\"indices\":[3,1],\"scores\":[0.5,0.25]}\n"
                                      "\n"
                                      "   \r\n"
                                      "{\"t\":6,\"indices\":[4,2,0]}\n"
                                      "{\"t\":7,\"indices\":[]}\n");
  const TokenFile tokens = read_token_file(file);
  EXPECT_EQ(tokens.indices.dtype, DType::i32);
  EXPECT_EQ(tokens.indices.shape, (Shape{3, 3}));
  EXPECT_EQ(i32_values(tokens.indices), (std::vector<int32_t>{3, 1, -1, 4, 2, 0, -1, -1, -1}));
  EXPECT_EQ(tokens.positions, (std::vector<int64_t>{5, 6, 7}));
}

TEST_F(Io, BatchedJsonlTokensAreGroupedByBatchElement) {
  const std::string file = write_file("sel.jsonl",
                                      "{\"b\":1,\"t\":2,\"indices\":[9]}\n"
                                      "{\"b\":0,\"t\":2,\"indices\":[1,0]}\n"
                                      "{\"b\":1,\"t\":3,\"indices\":[8,7]}\n"
                                      "{\"b\":0,\"t\":3,\"indices\":[2]}\n");
  const TokenFile tokens = read_token_file(file);
  EXPECT_EQ(tokens.indices.shape, (Shape{2, 2, 2}));
  EXPECT_EQ(i32_values(tokens.indices), (std::vector<int32_t>{1, 0, 2, -1, 9, -1, 8, 7}));
  EXPECT_EQ(tokens.positions, (std::vector<int64_t>{2, 3, 2, 3}));
}

TEST_F(Io, MalformedJsonlTokensAreBadInput) {
  const std::string bad_json =
      write_file("json.jsonl", "{\"t\":0,\"indices\":[0]}\n\n{\"t\":1,\"indices\":[0,\n");
  EXPECT_TRUE(fails_with_bad_input([&] { read_token_file(bad_json); }, {bad_json + ":3", "JSON"}));
  const std::string below = write_file("below.jsonl", "{\"t\":0,\"indices\":[0,-2]}\n");
  EXPECT_TRUE(fails_with_bad_input([&] { read_token_file(below); }, {below + ":1", "[-1, 2^31)"}));
  const std::string too_big = write_file("big.jsonl", "{\"t\":0,\"indices\":[2147483648]}\n");
  EXPECT_TRUE(fails_with_bad_input([&] { read_token_file(too_big); }, {too_big + ":1"}));
  const std::string no_t = write_file("not.jsonl", "{\"indices\":[0]}\n");
  EXPECT_TRUE(fails_with_bad_input([&] { read_token_file(no_t); }, {no_t + ":1", "\"t\""}));
  const std::string not_object = write_file("array.jsonl", "[0, 1]\n");
  EXPECT_TRUE(fails_with_bad_input([&] { read_token_file(not_object); }, {not_object + ":1"}));
  const std::string negative_b = write_file("negb.jsonl", "{\"b\":-1,\"t\":0,\"indices\":[0]}\n");
  EXPECT_TRUE(
      fails_with_bad_input([&] { read_token_file(negative_b); }, {negative_b + ":1", "\"b\""}));
  const std::string uneven = write_file("uneven.jsonl",
                                        "{\"b\":0,\"t\":0,\"indices\":[0]}\n"
                                        "{\"b\":0,\"t\":1,\"indices\":[0]}\n"
                                        "{\"b\":1,\"t\":1,\"indices\":[0]}\n");
  EXPECT_TRUE(fails_with_bad_input([&] { read_token_file(uneven); }, {uneven, "evenly"}));
  const std::string skipped = write_file("skipped.jsonl",
                                         "{\"b\":0,\"t\":0,\"indices\":[0]}\n"
                                         "{\"b\":0,\"t\":1,\"indices\":[0]}\n"
                                         "{\"b\":0,\"t\":2,\"indices\":[0]}\n"
                                         "{\"b\":2,\"t\":0,\"indices\":[0]}\n"
                                         "{\"b\":2,\"t\":1,\"indices\":[0]}\n"
                                         "{\"b\":2,\"t\":2,\"indices\":[0]}\n");
  EXPECT_TRUE(fails_with_bad_input([&] { read_token_file(skipped); }, {skipped, "batch element"}));
  const std::string empty = write_file("empty.jsonl", "\n\n");
  EXPECT_TRUE(fails_with_bad_input([&] { read_token_file(empty); }, {empty, "no rows"}));
  const std::string missing = path("missing.jsonl");
  EXPECT_TRUE(fails_with_bad_input([&] { read_token_file(missing); }, {missing}));
}

TEST_F(Io, NpyAndSafetensorsTokenFiles) {
  Tensor indices = make_tensor(DType::i32, {2, 3}, "idx");
  const std::vector<int32_t> values = {0, 4, -1, 2, 1, 0};
  std::memcpy(mutable_data<int32_t>(indices), values.data(), values.size() * 4);
  write_tensor(path("idx.npy"), indices);
  const TokenFile from_npy = read_token_file(path("idx.npy"));
  EXPECT_EQ(from_npy.indices.shape, (Shape{2, 3}));
  EXPECT_EQ(i32_values(from_npy.indices), values);
  EXPECT_TRUE(from_npy.positions.empty());

  write_safetensors(path("idx.safetensors"), {indices});
  EXPECT_EQ(i32_values(read_token_file(path("idx.safetensors:idx")).indices), values);

  write_tensor(path("floats.npy"), make_tensor(DType::f32, {2, 3}));
  EXPECT_TRUE(fails_with_bad_input([&] { read_token_file(path("floats.npy")); },
                                   {path("floats.npy"), "i32 or i64", "f32"}));
}

TEST_F(Io, JsonlSelectionLineFormat) {
  const int32_t indices[] = {5, 2, -1, -1};
  const float scores[] = {1.5f, std::nanf(""), 0.0f, 0.0f};
  EXPECT_EQ(jsonl_selection_line(0, false, 7, indices, scores, 4),
            "{\"t\":7,\"indices\":[5,2],\"scores\":[1.5,null]}\n");
  EXPECT_EQ(jsonl_selection_line(3, true, 7, indices, scores, 4),
            "{\"b\":3,\"t\":7,\"indices\":[5,2],\"scores\":[1.5,null]}\n");
  const float negative_infinity[] = {-INFINITY, 0.25f, 0.0f, 0.0f};
  EXPECT_EQ(jsonl_selection_line(0, false, 1, indices, negative_infinity, 2),
            "{\"t\":1,\"indices\":[5,2],\"scores\":[null,0.25]}\n");
  const int32_t padding[] = {-1, -1};
  EXPECT_EQ(jsonl_selection_line(0, false, 0, padding, scores, 2),
            "{\"t\":0,\"indices\":[],\"scores\":[]}\n");
  EXPECT_EQ(jsonl_selection_line(0, false, 0, padding, scores, 0),
            "{\"t\":0,\"indices\":[],\"scores\":[]}\n");
}

TEST_F(Io, JsonlSelectionLinesReadBack) {
  const int32_t rows[2][2][3] = {{{4, 1, -1}, {0, -1, -1}}, {{2, 3, 1}, {5, -1, -1}}};
  const float scores[3] = {0.5f, -1.0f, 3.0f};
  {
    OutputFile out(path("sel.jsonl"));
    for (int b = 0; b < 2; ++b) {
      for (int t = 0; t < 2; ++t)
        out.write(jsonl_selection_line(b, true, 10 + t, rows[b][t], scores, 3));
    }
    out.commit();
  }
  const TokenFile tokens = read_token_file(path("sel.jsonl"));
  EXPECT_EQ(tokens.indices.shape, (Shape{2, 2, 3}));
  EXPECT_EQ(i32_values(tokens.indices),
            (std::vector<int32_t>{4, 1, -1, 0, -1, -1, 2, 3, 1, 5, -1, -1}));
  EXPECT_EQ(tokens.positions, (std::vector<int64_t>{10, 11, 10, 11}));
}

}  // namespace
}  // namespace dsa
