#include "hybrid/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "hybrid/error.h"

namespace hybrid::log {
namespace {

spdlog::logger& logger() {
  static auto instance = [] {
    auto l = spdlog::stderr_color_mt("hybrid");
    l->set_pattern("%Y-%m-%d %H:%M:%S %^%l%$ %v");
    return l;
  }();
  return *instance;
}

std::string& tag() {
  static std::string instance;
  return instance;
}

}  // namespace

void set_level(const std::string& level) {
  auto lvl = spdlog::level::from_str(level);
  if (lvl == spdlog::level::off && level != "off") throw ConfigError("unknown log level '" + level + "'");
  logger().set_level(lvl);
}

void set_rank(int rank, int world_size) {
  if (world_size <= 1) return;
  tag() = "[rank " + std::to_string(rank) + "] ";
  logger().set_pattern("%Y-%m-%d %H:%M:%S " + tag() + "%^%l%$ %v");
}

std::string rank_tag() { return tag(); }

void debug(const std::string& msg) { logger().debug(msg); }
void info(const std::string& msg) { logger().info(msg); }
void warn(const std::string& msg) { logger().warn(msg); }
void error(const std::string& msg) { logger().error(msg); }

}  // namespace hybrid::log
