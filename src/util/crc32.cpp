#include "hybrid/util/crc32.h"

#include <ATen/Parallel.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "hybrid/error.h"

namespace hybrid::util {

uint32_t crc32_of(const unsigned char* data, size_t size, size_t piece) {
  piece = std::clamp<size_t>(piece, 1, size_t{1} << 30);  // zlib takes 32-bit lengths
  const size_t pieces = (size + piece - 1) / piece;
  auto length = [&](size_t i) { return std::min(piece, size - i * piece); };
  std::vector<uLong> crcs(pieces);
  // Threads of our own, as many as the intra-op pool has: at::parallel_for's OpenMP loop is
  // compiled into the caller, and this library is built without -fopenmp (it ran on one thread).
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < pieces;) crcs[i] = crc32(crc32(0L, Z_NULL, 0), data + i * piece, static_cast<uInt>(length(i)));
  };
  const size_t helpers = std::min<size_t>(pieces, static_cast<size_t>(std::max(1, at::get_num_threads()))) - (pieces > 0);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < helpers; ++t) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
  uLong crc = crc32(0L, Z_NULL, 0);
  for (size_t i = 0; i < pieces; ++i) crc = crc32_combine(crc, crcs[i], static_cast<z_off_t>(length(i)));
  return static_cast<uint32_t>(crc);
}

void crc32_append(CrcRange& range, uint32_t crc, uint64_t size) {
  range.crc = static_cast<uint32_t>(crc32_combine(range.crc, crc, static_cast<z_off_t>(size)));
  range.end += size;
}

uint32_t crc32_join(std::vector<CrcRange> ranges, uint64_t size) {
  std::sort(ranges.begin(), ranges.end(), [](const CrcRange& a, const CrcRange& b) { return a.begin < b.begin; });
  uLong crc = crc32(0L, Z_NULL, 0);
  uint64_t covered = 0;
  for (const CrcRange& r : ranges) {
    if (r.begin == r.end) continue;
    if (r.begin != covered || r.end < r.begin)
      throw Error("byte " + std::to_string(std::min(r.begin, covered)) + (r.begin > covered ? " was not written" : " was written twice"));
    crc = crc32_combine(crc, r.crc, static_cast<z_off_t>(r.end - r.begin));
    covered = r.end;
  }
  if (covered != size) throw Error("byte " + std::to_string(covered) + (covered < size ? " was not written" : " is past the end"));
  return static_cast<uint32_t>(crc);
}

}  // namespace hybrid::util
