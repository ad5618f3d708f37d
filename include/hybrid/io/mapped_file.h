// A memory map of a whole file; the bytes stay valid while the object lives. Read-only, or
// copy-on-write: writable, a write changing only this process's copy of the page, never the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace hybrid::io {

class MappedFile {
 public:
  // Throws hybrid::Error naming the path.
  explicit MappedFile(const std::string& path, bool copy_on_write = false);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& other) noexcept;

  const uint8_t* data() const { return data_; }
  uint8_t* writable_data() const { return copy_on_write_ ? const_cast<uint8_t*>(data_) : nullptr; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool copy_on_write_ = false;
};

// Writes `path` durably or not at all: bytes go to a temporary file beside it; commit()
// fsyncs, renames over `path` and fsyncs the directory. A full disk or any failure throws
// naming the file, and an uncommitted file is removed, so `path` keeps its old content.
class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  void write(const void* bytes, size_t n);
  void commit();

 private:
  [[noreturn]] void fail(const std::string& what);
  std::string path_, tmp_;
  int fd_ = -1;
};

// A file several processes write at once, each at its own offsets: created if missing and never
// truncated on open (another process's bytes may already be there). Failures throw naming the file.
class PositionalFile {
 public:
  explicit PositionalFile(const std::string& path);
  ~PositionalFile();
  PositionalFile(const PositionalFile&) = delete;
  PositionalFile& operator=(const PositionalFile&) = delete;
  void write_at(uint64_t offset, const void* bytes, size_t n);
  void resize(uint64_t size);
  void sync();  // fsync: what this process wrote is on disk

 private:
  [[noreturn]] void fail(const std::string& what) const;
  std::string path_;
  int fd_ = -1;
};

void write_file_atomic(const std::string& path, const std::string& bytes);
void fsync_directory(const std::string& dir);

}  // namespace hybrid::io
