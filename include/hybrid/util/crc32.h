// CRC-32 (zlib's) of a buffer, its pieces on several threads: a checkpoint's files are
// checked whole at every save and on every rank's load, 89 GB at 7b.yaml's size, which one thread
// (zlib, about 4.3 GB/s) took about 21 s over.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hybrid::util {

// The same value as zlib's crc32 over the whole buffer: its pieces of `piece` bytes on as many
// threads as ATen's intra-op pool has (at::get_num_threads(): a rank's share of the CPUs under
// --nproc-per-node), their values joined in order by crc32_combine.
uint32_t crc32_of(const unsigned char* data, size_t size, size_t piece = size_t{64} << 20);

}  // namespace hybrid::util
