#include "cli/mods_from_args.h"

#include <cctype>
#include <map>

#include "cli/npy.h"

namespace flexjit::cli {

std::pair<std::string, std::string> split_assignment(const std::string& s, const std::string& flag) {
  auto eq = s.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == s.size())
    throw Error(flag + " expects NAME=VALUE, got '" + s + "'");
  return {s.substr(0, eq), s.substr(eq + 1)};
}

namespace {

double parse_number(const std::string& name, const std::string& text) {
  try {
    size_t used = 0;
    double v = std::stod(text, &used);
    if (used == text.size()) return v;
  } catch (const std::logic_error&) {
  }
  throw Error("--param " + name + "=" + text + ": '" + text + "' is not a number");
}

// One mod argument: a registered name (its buffers from files if given, else examples for the
// shape; params default unless given) or expression text over the given buffers and params.
TracedMod resolve_one(const std::string& arg, ModKind kind, const std::vector<OwnedTensor>& files,
                      const std::map<std::string, double>& params, const ShapeInfo& shape,
                      std::vector<OwnedTensor>* storage, std::string* describe) {
  const char* what = kind == ModKind::Score ? "score_mod" : "mask_mod";
  if (has_mod(arg)) {
    const RegisteredMod& m = find_mod(arg);
    if (m.kind != kind)
      throw Error(std::string("'") + arg + "' is a " + (m.kind == ModKind::Score ? "score_mod" : "mask_mod") +
                  ", not a " + what + "; pass it with --" + (m.kind == ModKind::Score ? "score-mod" : "mask-mod"));
    TracedMod t = instantiate_example(m, shape, storage);
    for (auto& [n, view] : t.bindings.buffers)
      for (const auto& f : files)
        if (f.name == n) {
          view = f.view;
          storage->push_back(f);
        }
    for (auto& [n, v] : t.bindings.params) {
      auto it = params.find(n);
      if (it != params.end()) v = it->second;
    }
    *describe += std::string(what) + "=" + arg + " (" + m.text + ") ";
    return t;
  }
  // A bare word that names nothing in scope is most likely a misspelt mod name: say so, with
  // the registered names, rather than a parse error about an unknown variable.
  bool bare_word = !arg.empty() && (std::isalpha(static_cast<unsigned char>(arg[0])) || arg[0] == '_');
  for (char ch : arg) bare_word &= std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '-';
  if (bare_word) {
    bool known = params.count(arg) > 0;
    for (const char* v : {"score", "b", "h", "q_idx", "kv_idx", "true", "false", "inf", "INFINITY"}) known |= arg == v;
    for (const auto& f : files) known |= f.name == arg;
    if (!known) {
      std::string names;
      for (const auto& n : mod_names(kind)) names += (names.empty() ? "" : ", ") + n;
      throw Error(std::string("unknown ") + what + " '" + arg + "': not a registered " + what + " (" + names +
                  ") nor an expression over known names");
    }
  }
  std::vector<std::pair<std::string, double>> plist(params.begin(), params.end());
  TracedMod t = parse_mod(arg, kind, files, plist);
  for (const auto& [n, v] : t.bindings.buffers)
    for (const auto& f : files)
      if (f.name == n) storage->push_back(f);
  *describe += std::string(what) + "=" + ir::to_string(t.expr) + " ";
  return t;
}

}  // namespace

ResolvedMods resolve_mods(const ModArgs& a, const ShapeInfo& shape) {
  ResolvedMods r;
  std::vector<OwnedTensor> files;
  for (const auto& spec : a.buffer_specs) {
    auto [name, path] = split_assignment(spec, "--buffer");
    OwnedTensor t = load_npy(path, name);
    if (t.view.dtype == DType::Bool) {  // bool masks become int32 0/1
      OwnedTensor i = OwnedTensor::make(name, DType::I32, std::vector<int64_t>(t.view.sizes, t.view.sizes + t.view.rank));
      for (int64_t j = 0; j < t.view.numel(); ++j) i.data<int32_t>()[j] = t.data<unsigned char>()[j] != 0;
      t = i;
    }
    files.push_back(t);
  }
  std::map<std::string, double> params;
  for (const auto& spec : a.param_specs) {
    auto [name, text] = split_assignment(spec, "--param");
    params[name] = parse_number(name, text);
  }
  TracedMod sm, mm;
  if (!a.score_mod.empty())
    sm = resolve_one(a.score_mod, ModKind::Score, files, params, shape, &r.storage, &r.describe);
  if (!a.mask_mod.empty())
    mm = resolve_one(a.mask_mod, ModKind::Mask, files, params, shape, &r.storage, &r.describe);
  auto [set, bind] = combine(a.score_mod.empty() ? nullptr : &sm, a.mask_mod.empty() ? nullptr : &mm);
  r.mods = std::move(set);
  r.bind = std::move(bind);
  if (r.describe.empty()) r.describe = "no mods";
  return r;
}

}  // namespace flexjit::cli
