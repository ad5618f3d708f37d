#include "hybrid/data/choice_task.h"

#include <algorithm>
#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>

#include "hybrid/error.h"

namespace hybrid::data {
namespace {

constexpr const char* kFormat = "hybrid-choice-task-v1";

std::vector<int64_t> ids(const nlohmann::json& j, const char* what, int64_t vocab_size) {
  if (!j.is_array() || j.empty()) throw Error(std::string(what) + ": expected a non-empty list of token ids");
  std::vector<int64_t> out;
  out.reserve(j.size());
  for (const auto& v : j) {
    if (!v.is_number_integer()) throw Error(std::string(what) + ": expected integer token ids");
    const int64_t id = v.get<int64_t>();
    if (id < 0 || id >= vocab_size)
      throw Error(std::string(what) + ": token id " + std::to_string(id) + " is outside the model's vocabulary [0, " +
                  std::to_string(vocab_size) + ")");
    out.push_back(id);
  }
  return out;
}

ChoiceItem parse_item(const nlohmann::json& j, int64_t vocab_size, int64_t max_len) {
  if (!j.is_object()) throw Error("expected an object");
  for (const char* key : {"context", "choices", "choice_bytes", "label"})
    if (!j.contains(key)) throw Error(std::string("no '") + key + "'");
  ChoiceItem item;
  item.context = ids(j["context"], "context", vocab_size);
  const auto& choices = j["choices"];
  const auto& bytes = j["choice_bytes"];
  if (!choices.is_array() || choices.size() < 2) throw Error("choices: expected a list of at least two");
  if (!bytes.is_array() || bytes.size() != choices.size()) throw Error("choice_bytes: expected one count a choice");
  for (size_t c = 0; c < choices.size(); ++c) {
    const std::string what = "choices[" + std::to_string(c) + "]";
    item.choices.push_back(ids(choices[c], what.c_str(), vocab_size));
    if (static_cast<int64_t>(item.choices.back().size()) >= max_len)
      throw Error(what + ": " + std::to_string(item.choices.back().size()) + " tokens, the model scores at most " +
                  std::to_string(max_len - 1));
    if (!bytes[c].is_number_integer() || bytes[c].get<int64_t>() <= 0)
      throw Error("choice_bytes[" + std::to_string(c) + "]: expected a positive integer");
    item.choice_bytes.push_back(bytes[c].get<int64_t>());
  }
  if (!j["label"].is_number_integer()) throw Error("label: expected an integer");
  item.label = j["label"].get<int64_t>();
  if (item.label < 0 || item.label >= static_cast<int64_t>(item.choices.size()))
    throw Error("label " + std::to_string(item.label) + " with " + std::to_string(item.choices.size()) + " choices");
  return item;
}

}  // namespace

std::vector<double> ChoiceTotals::values() const {
  return {items, right, right_per_byte, right_per_token, label_nats, label_bytes, chance};
}

ChoiceTotals ChoiceTotals::from_values(const std::vector<double>& v) {
  return {v.at(0), v.at(1), v.at(2), v.at(3), v.at(4), v.at(5), v.at(6)};
}

ChoiceScores choice_scores(const ChoiceTotals& t) {
  const double n = std::max(t.items, 1.0);
  return {static_cast<int64_t>(t.items), t.right / n, t.right_per_byte / n, t.right_per_token / n,
          t.label_nats / std::log(2.0) / std::max(t.label_bytes, 1.0), t.chance / n};
}

ChoiceTask read_choice_task(const std::string& name, const std::string& path, int64_t vocab_size, int64_t max_len,
                            int64_t limit) {
  std::ifstream in(path);
  if (!in) throw Error(path + ": cannot open the task file");
  ChoiceTask task{name, path, {}};
  std::string line;
  int64_t line_no = 0;
  bool header = false;
  while (std::getline(in, line) && (limit <= 0 || static_cast<int64_t>(task.items.size()) < limit)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      const auto j = nlohmann::json::parse(line);
      if (!header) {
        header = true;
        if (!j.is_object() || !j.contains("format") || j["format"] != kFormat)
          throw Error(std::string("not a task file (expected a header line with \"format\": \"") + kFormat +
                      "\"; scripts/prepare_task.py writes them)");
        continue;
      }
      task.items.push_back(parse_item(j, vocab_size, max_len));
    } catch (const nlohmann::json::exception& e) {
      throw Error(path + ":" + std::to_string(line_no) + ": not JSON (" + e.what() + ")");
    } catch (const Error& e) {
      throw Error(path + ":" + std::to_string(line_no) + ": " + e.what());
    }
  }
  if (in.bad()) throw Error(path + ": read error");
  if (task.items.empty()) throw Error(path + ": no items");
  return task;
}

}  // namespace hybrid::data
