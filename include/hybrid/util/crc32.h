// CRC-32 (zlib's) of a buffer, its pieces on several threads: a checkpoint's files are
// checked whole at every save and on every rank's load, 89 GB at 7b.yaml's size, which one thread
// (zlib, about 4.3 GB/s) took about 21 s over.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace hybrid::util {

// The same value as zlib's crc32 over the whole buffer: its pieces of `piece` bytes on as many
// threads as ATen's intra-op pool has (at::get_num_threads(): a rank's share of the CPUs under
// --nproc-per-node), their values joined in order by crc32_combine.
uint32_t crc32_of(const unsigned char* data, size_t size, size_t piece = size_t{64} << 20);

// The CRC-32 of bytes [begin, end) of a file, as the process that wrote them computed it: files
// that several processes write together get their checksum without anyone reading them back.
struct CrcRange {
  uint64_t begin = 0, end = 0;
  uint32_t crc = 0;  // of an empty range: 0
};
// `range` grown by the `size` bytes that follow it, whose CRC-32 is `crc`.
void crc32_append(CrcRange& range, uint32_t crc, uint64_t size);
// The CRC-32 of a whole file of `size` bytes from ranges in any order; throws (naming the first
// byte not covered once) unless they cover it exactly.
uint32_t crc32_join(std::vector<CrcRange> ranges, uint64_t size);

}  // namespace hybrid::util
