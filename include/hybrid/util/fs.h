// File-system helpers for code linked with torch. libtorch.so exports its own copies of some
// std::filesystem symbols, and std::filesystem::remove_all resolved to it crashes (seen with
// the 2.11.0 wheel); these use POSIX calls instead.
#pragma once

#include <string>

namespace hybrid::util {

// Removes a file or a directory tree; a missing path is not an error. Throws hybrid::Error.
void remove_tree(const std::string& path);

// The whole file as a string; throws hybrid::Error naming the path if it cannot be read.
std::string read_text_file(const std::string& path);

}  // namespace hybrid::util
