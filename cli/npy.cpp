#include "cli/npy.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>

#include <unistd.h>

namespace flexjit::cli {
namespace {

[[noreturn]] void bad(const std::string& path, const std::string& why) {
  throw Error("cannot read '" + path + "' as .npy: " + why);
}

DType parse_descr(const std::string& path, const std::string& d) {
  if (d == "<f4") return DType::F32;
  if (d == "<f2") return DType::F16;
  if (d == "<f8") return DType::F64;
  if (d == "<i4") return DType::I32;
  if (d == "<i8") return DType::I64;
  if (d == "|b1") return DType::Bool;
  bad(path, "element type '" + d + "' is not supported (use float32, float16, float64, int32, int64 or bool, "
            "little-endian)");
}

}  // namespace

OwnedTensor load_npy(const std::string& path, const std::string& name) {
  std::ifstream f(path, std::ios::binary);
  if (!f) bad(path, "the file does not exist or cannot be opened");
  std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (data.size() < 10 || data.compare(0, 6, "\x93NUMPY") != 0) bad(path, "missing the \\x93NUMPY magic");
  int major = static_cast<unsigned char>(data[6]);
  size_t hlen, hstart;
  if (major == 1) {
    hlen = static_cast<unsigned char>(data[8]) | (static_cast<unsigned char>(data[9]) << 8);
    hstart = 10;
  } else if (major == 2 || major == 3) {
    if (data.size() < 12) bad(path, "truncated header");
    hlen = 0;
    for (int i = 0; i < 4; ++i) hlen |= size_t(static_cast<unsigned char>(data[8 + i])) << (8 * i);
    hstart = 12;
  } else {
    bad(path, "unknown format version " + std::to_string(major));
  }
  if (hstart + hlen > data.size()) bad(path, "truncated header");
  std::string header = data.substr(hstart, hlen);
  std::smatch m;
  if (!std::regex_search(header, m, std::regex("'descr'\\s*:\\s*'([^']*)'"))) bad(path, "header has no descr");
  DType dtype = parse_descr(path, m[1]);
  if (!std::regex_search(header, m, std::regex("'fortran_order'\\s*:\\s*(True|False)")))
    bad(path, "header has no fortran_order");
  bool fortran = m[1] == "True";
  if (!std::regex_search(header, m, std::regex("'shape'\\s*:\\s*\\(([^)]*)\\)"))) bad(path, "header has no shape");
  std::vector<int64_t> shape;
  std::stringstream ss(m[1].str());
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.find_first_not_of(" \t") == std::string::npos) continue;
    try {
      long long v = std::stoll(item);
      if (v < 0) bad(path, "negative dimension");
      shape.push_back(v);
    } catch (const std::logic_error&) {
      bad(path, "bad shape entry '" + item + "'");
    }
  }
  if (shape.size() > 4) bad(path, "rank " + std::to_string(shape.size()) + " > 4");
  if (shape.empty()) shape.push_back(1);  // a 0-d array is read as [1]
  OwnedTensor t = OwnedTensor::make(name, dtype, shape);
  size_t bytes = t.bytes->size();
  size_t body = hstart + hlen;
  if (data.size() - body != bytes)
    bad(path, "data is " + std::to_string(data.size() - body) + " bytes but shape " + t.view.shape_str() +
                  " of " + dtype_name(dtype) + " needs " + std::to_string(bytes));
  if (!fortran || t.view.rank <= 1) {
    std::memcpy(t.bytes->data(), data.data() + body, bytes);
  } else {
    // Fortran order: the first index varies fastest. Copy element by element to C order.
    int r = t.view.rank;
    int64_t fstride[4], n = t.view.numel(), es = dtype_size(dtype);
    int64_t s = 1;
    for (int d = 0; d < r; ++d) {
      fstride[d] = s;
      s *= t.view.sizes[d];
    }
    for (int64_t i = 0; i < n; ++i) {
      int64_t rem = i, src = 0;
      for (int d = r - 1; d >= 0; --d) {
        src += (rem % t.view.sizes[d]) * fstride[d];
        rem /= t.view.sizes[d];
      }
      std::memcpy(t.bytes->data() + i * es, data.data() + body + src * es, size_t(es));
    }
  }
  return t;
}

void OutputFiles::add_bytes(const std::string& flag, const std::string& path, const std::string& bytes) {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
  if (!f) throw Error("cannot write " + flag + " '" + path + "': the directory does not exist or is not writable");
  pending_.push_back({tmp, path});
  f.write(bytes.data(), std::streamsize(bytes.size()));
  f.flush();
  if (!f) throw Error("writing " + flag + " '" + path + "' failed (disk full?)");
}

void OutputFiles::add_npy_f32(const std::string& flag, const std::string& path, const std::vector<float>& data,
                              const std::vector<int64_t>& shape) {
  std::string shp = "(";
  for (size_t i = 0; i < shape.size(); ++i) shp += std::to_string(shape[i]) + (shape.size() == 1 ? "," : i + 1 < shape.size() ? ", " : "");
  shp += ")";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shp + ", }";
  size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::string bytes = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0, char(header.size() & 0xff), char(header.size() >> 8)};
  bytes += header;
  bytes.append(reinterpret_cast<const char*>(data.data()), data.size() * 4);
  add_bytes(flag, path, bytes);
}

void OutputFiles::add_text(const std::string& flag, const std::string& path, const std::string& text) {
  add_bytes(flag, path, text);
}

void OutputFiles::commit() {
  for (size_t i = 0; i < pending_.size(); ++i)
    if (std::rename(pending_[i].first.c_str(), pending_[i].second.c_str()) != 0) {
      for (size_t j = 0; j < i; ++j) std::remove(pending_[j].second.c_str());
      throw Error("cannot write '" + pending_[i].second + "': rename failed");
    }
  pending_.clear();
}

OutputFiles::~OutputFiles() {
  for (const auto& [tmp, final_path] : pending_) std::remove(tmp.c_str());
}

OwnedTensor convert(const OwnedTensor& t, DType dtype) {
  if (!dtype_is_float(t.view.dtype))
    throw Error("'" + t.name + "' has dtype " + dtype_name(t.view.dtype) + "; q, k and v must be floating point");
  std::vector<int64_t> shape(t.view.sizes, t.view.sizes + t.view.rank);
  OwnedTensor o = OwnedTensor::make(t.name, dtype, shape);
  if (dtype != DType::F32 && dtype != DType::BF16 && dtype != DType::F16)
    throw Error(std::string("--dtype ") + dtype_name(dtype) + " is not supported; use fp32, bf16 or fp16");
  for (int64_t i = 0; i < t.view.numel(); ++i) write_element_f64(o.view, i, read_element_f64(t.view, i));
  return o;
}

}  // namespace flexjit::cli
