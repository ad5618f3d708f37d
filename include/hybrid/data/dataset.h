// Fixed-length instances over token files, as OLMo cuts them: each file's tokens are split
// into seq_len windows and the remainder dropped. Sources group files (globs expanded and
// sorted) and carry a mixture weight; instances are addressed implicitly (no per-instance
// table), so a 6T-token dataset costs a few bytes per file.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "hybrid/config/config.h"
#include "hybrid/data/token_file.h"

namespace hybrid::data {

// Files matching a path or glob, sorted; no match is an error naming the pattern.
std::vector<std::string> expand_glob(const std::string& pattern);

class Source {
 public:
  Source(const DataSourceConfig& cfg, int64_t seq_len, int64_t vocab_size, const std::string& key);
  uint64_t num_instances() const { return starts_.back(); }
  int64_t seq_len() const { return seq_len_; }
  double weight() const { return weight_; }
  void read_instance(uint64_t index, int64_t* out) const;  // seq_len tokens
  // Hash of the file names, their sizes and seq_len: what a checkpoint's loader state is tied to.
  uint64_t fingerprint() const { return fingerprint_; }

 private:
  std::vector<std::unique_ptr<TokenFile>> files_;
  std::vector<uint64_t> starts_;  // first instance of each file, plus the total
  int64_t seq_len_;
  double weight_;
  uint64_t fingerprint_;
};

class TokenDataset {
 public:
  TokenDataset(const std::vector<DataSourceConfig>& sources, int64_t seq_len, int64_t vocab_size);
  int64_t seq_len() const { return seq_len_; }
  const std::vector<Source>& sources() const { return sources_; }
  uint64_t fingerprint() const;

 private:
  int64_t seq_len_;
  std::vector<Source> sources_;
};

}  // namespace hybrid::data
