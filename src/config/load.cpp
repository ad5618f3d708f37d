// Node tree -> typed Config (and back to YAML), driven by each struct's visit() list.
#include "hybrid/config/load.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <initializer_list>
#include <type_traits>

#include "hybrid/error.h"
#include "node.h"

namespace hybrid {
namespace {
using config::Node;


size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] != b[j - 1])});
      diag = up;
    }
  }
  return row[b.size()];
}

std::string did_you_mean(const std::string& key, const std::vector<std::string>& known) {
  std::string best;
  size_t best_d = std::max<size_t>(2, key.size() / 3) + 1;
  for (const auto& k : known) {
    size_t d = edit_distance(key, k);
    if (d < best_d) best_d = d, best = k;
  }
  return best.empty() ? "" : " (did you mean '" + best + "'?)";
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// Reads one map node into one struct; records origins and rejects unknown keys.
class Reader {
 public:
  Reader(const Node& node, std::string prefix, LoadedConfig& out)
      : node_(node), prefix_(std::move(prefix)), out_(out) {}

  template <class T>
  void operator()(const char* key, T& field, std::initializer_list<const char*> allowed = {}) {
    known_.push_back(key);
    const Node* n = node_.find(key);
    if (!n) return;
    read(*n, prefix_ + key, field);
    if constexpr (std::is_same_v<T, std::string>) {
      if (allowed.size() && std::none_of(allowed.begin(), allowed.end(),
                                         [&](const char* a) { return field == a; })) {
        std::vector<std::string> names(allowed.begin(), allowed.end());
        throw ConfigError(n->origin + ": " + prefix_ + key + ": '" + field + "' is not one of " + join(names));
      }
    }
  }

  void check_unknown() const {
    for (const auto& [key, value] : node_.entries)
      if (std::find(known_.begin(), known_.end(), key) == known_.end())
        throw ConfigError(value.origin + ": unknown key '" + prefix_ + key + "'" + did_you_mean(key, known_));
  }

 private:
  [[noreturn]] static void type_error(const Node& n, const std::string& path, const char* expected) {
    std::string got = n.kind == Node::Kind::Scalar ? "'" + n.scalar + "'"
                      : n.kind == Node::Kind::List ? "a list"
                      : n.kind == Node::Kind::Map  ? "a map" : "nothing";
    throw ConfigError(n.origin + ": " + path + ": expected " + expected + ", got " + got);
  }

  void leaf(const Node& n, const std::string& path) { out_.origins[path] = n.origin; }

  void read(const Node& n, const std::string& path, int64_t& x) {
    if (n.kind != Node::Kind::Scalar) type_error(n, path, "an integer");
    const char* end = n.scalar.data() + n.scalar.size();
    auto [p, ec] = std::from_chars(n.scalar.data(), end, x);
    if (ec != std::errc() || p != end) type_error(n, path, "an integer");
    leaf(n, path);
  }
  void read(const Node& n, const std::string& path, double& x) {
    if (n.kind != Node::Kind::Scalar) type_error(n, path, "a number");
    const char* end = n.scalar.data() + n.scalar.size();
    auto [p, ec] = std::from_chars(n.scalar.data(), end, x);
    if (ec != std::errc() || p != end || !std::isfinite(x)) type_error(n, path, "a number");
    leaf(n, path);
  }
  void read(const Node& n, const std::string& path, bool& x) {
    if (n.kind == Node::Kind::Scalar && (n.scalar == "true" || n.scalar == "false"))
      x = n.scalar == "true";
    else
      type_error(n, path, "true or false");
    leaf(n, path);
  }
  void read(const Node& n, const std::string& path, std::string& x) {
    if (n.kind != Node::Kind::Scalar) type_error(n, path, "a string");
    x = n.scalar;
    leaf(n, path);
  }
  template <class T>
  void read(const Node& n, const std::string& path, std::vector<T>& xs) {
    if (n.kind == Node::Kind::Null) { xs.clear(); leaf(n, path); return; }
    if constexpr (std::is_class_v<T> && !std::is_same_v<T, std::string>) {
      if (n.kind == Node::Kind::Map) {  // one map where a list of maps goes: a list of one
        xs.assign(1, T{});
        read(n, path + "[0]", xs[0]);
        leaf(n, path);
        return;
      }
    }
    if (n.kind != Node::Kind::List) type_error(n, path, "a list");
    xs.clear();
    for (size_t i = 0; i < n.items.size(); ++i) {
      xs.emplace_back();
      read(n.items[i], path + "[" + std::to_string(i) + "]", xs.back());
    }
    leaf(n, path);
  }
  template <class S>
    requires std::is_class_v<S> && (!std::is_same_v<S, std::string>)
  void read(const Node& n, const std::string& path, S& section) {
    if (n.kind != Node::Kind::Map) type_error(n, path, "a map of keys");
    Reader sub(n, path + ".", out_);
    section.visit(sub);
    sub.check_unknown();
    leaf(n, path);  // where the section is, for checks of the section as a whole
  }

  const Node& node_;
  std::string prefix_;
  LoadedConfig& out_;
  std::vector<std::string> known_;
};

class Writer {
 public:
  explicit Writer(YAML::Emitter& e) : e_(e) {}
  template <class T>
  void operator()(const char* key, const T& field, std::initializer_list<const char*> = {}) {
    e_ << YAML::Key << key << YAML::Value;
    write(field);
  }

 private:
  void write(int64_t x) { e_ << x; }
  void write(bool x) { e_ << x; }
  void write(const std::string& x) { e_ << YAML::DoubleQuoted << x; }
  void write(double x) {
    char buf[32];
    auto [p, ec] = std::to_chars(buf, buf + sizeof buf, x);  // shortest round-trip form
    std::string s(buf, p);
    if (s.find_first_of(".en") == std::string::npos) s += ".0";
    e_ << s;
  }
  template <class T> void write(const std::vector<T>& xs) {
    e_ << YAML::Flow << YAML::BeginSeq;
    for (const auto& x : xs) write(x);
    e_ << YAML::EndSeq;
  }
  template <class S>
    requires std::is_class_v<S> && (!std::is_same_v<S, std::string>)
  void write(const S& section) {
    e_ << YAML::Block << YAML::BeginMap;
    const_cast<S&>(section).visit(*this);
    e_ << YAML::EndMap;
  }
  template <class S>
    requires std::is_class_v<S> && (!std::is_same_v<S, std::string>)
  void write(const std::vector<S>& xs) {
    e_ << YAML::Block << YAML::BeginSeq;
    for (const auto& x : xs) write(x);
    e_ << YAML::EndSeq;
  }
  YAML::Emitter& e_;
};

}  // namespace

namespace {

LoadedConfig read_tree(const Node& root) {
  LoadedConfig loaded;
  Reader reader(root, "", loaded);
  loaded.config.visit(reader);
  reader.check_unknown();
  validate_config(loaded);
  return loaded;
}

}  // namespace

LoadedConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  Node root = config::load_yaml_with_bases(path);
  for (const auto& o : overrides) config::apply_override(root, o);
  return read_tree(root);
}

LoadedConfig load_config_text(const std::string& yaml, const std::string& name) {
  Node root = config::parse_yaml(yaml, name);
  if (root.kind == Node::Kind::Null) root.kind = Node::Kind::Map;
  if (root.kind != Node::Kind::Map) throw ConfigError(root.origin + ": a config must be a map of keys at the top level");
  return read_tree(root);
}

std::string config_to_yaml(const Config& config) {
  YAML::Emitter e;
  Writer w(e);
  e << YAML::BeginMap;
  const_cast<Config&>(config).visit(w);
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

}  // namespace hybrid
