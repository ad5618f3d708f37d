// Test fixture: a fresh temporary folder per test (removed afterwards), file helpers, and the
// message of the hybrid::Error an action throws.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "hybrid/error.h"
#include "hybrid/util/fs.h"

class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("hybrid_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { hybrid::util::remove_tree(dir_.string()); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  // Writes `text` to a file in the folder and returns its path.
  std::string write(const std::string& name, const std::string& text) const {
    std::ofstream(path(name), std::ios::binary) << text;
    return path(name);
  }
  static std::string slurp(const std::string& p) { return hybrid::util::read_text_file(p); }
  // The message of the hybrid::Error that f() throws, or "" when it throws none.
  template <class F> static std::string error_from(F&& f) {
    try {
      f();
    } catch (const hybrid::Error& e) {
      return e.what();
    }
    return "";
  }
  std::filesystem::path dir_;
};
