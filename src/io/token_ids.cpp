#include "hybrid/io/token_ids.h"

#include <ATen/ATen.h>

#include <sstream>
#include <vector>

#include "hybrid/error.h"
#include "hybrid/io/npy.h"

namespace hybrid::io {
namespace {

at::Tensor checked(at::Tensor ids, int64_t vocab, const std::string& source) {
  if (!at::isIntegralType(ids.scalar_type(), /*includeBool=*/false))
    throw Error(source + ": token ids must be integers, got " + c10::toString(ids.scalar_type()));
  ids = ids.to(at::kLong);
  if (ids.dim() == 1) ids = ids.unsqueeze(0);
  if (ids.dim() != 2 || ids.size(1) == 0) throw Error(source + ": expected [T] or [B, T] token ids with T >= 1");
  const at::Tensor flat = ids.flatten();
  const at::Tensor bad = at::nonzero(flat.lt(0) | flat.ge(vocab));
  if (bad.size(0) > 0) {
    const int64_t at = bad[0][0].item<int64_t>();
    throw Error(source + ": token id " + std::to_string(flat[at].item<int64_t>()) + " at offset " + std::to_string(at) +
                " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  }
  return ids;
}

}  // namespace

at::Tensor read_token_ids(const std::string& npy_path, int64_t vocab) {
  return checked(read_npy(npy_path), vocab, npy_path);
}

at::Tensor parse_token_ids(const std::string& text, const std::string& source, int64_t vocab) {
  std::string spaced = text;
  for (char& c : spaced)
    if (c == ',') c = ' ';
  std::istringstream in(spaced);
  std::vector<int64_t> ids;
  std::string word;
  while (in >> word) {
    size_t used = 0;
    int64_t id = 0;
    try {
      id = std::stoll(word, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != word.size()) throw Error(source + ": '" + word + "' is not a token id");
    ids.push_back(id);
  }
  return checked(at::tensor(ids, at::kLong), vocab, source);
}

}  // namespace hybrid::io
