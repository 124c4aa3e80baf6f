// The replay's recorder in C++: zygote_torch/runtime/replay.py, ReplayRecorder.__torch_function__.
//
// While a replay runs, every torch call of the user's forward reaches the recorder. Most either are
// the trace's next call (checked against the trace, run, their outputs noted) or touch no tracked
// tensor (run as they are). In Python each costs a few microseconds of interpreter work on top of
// the call itself; here, a fraction of one. This file does only the usual case and decides nothing
// of its own: whatever it does not recognise (another kind of argument, a difference from the
// trace, an in-place call, the first call, the safety net) it hands, unchanged, to the Python
// method it stands for, which decides. The rule is one way: a call this code accepts is one the
// Python method accepts, and is done as it does it.
//
// replay_handler(recorder) gives the function to install as the recorder's __torch_function__ (a
// builtin bound to the recorder, which torch calls as it calls a mode's method);
// replay_configure(dict) gives it the Python objects it compares against (see replay.py,
// _native_configuration).

#include <Python.h>

#include <torch/csrc/Device.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

// An owned reference.
class Ref {
 public:
  Ref() = default;
  explicit Ref(PyObject* p) : p_(p) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_XDECREF(p_); }
  PyObject* get() const { return p_; }
  PyObject* release() {
    PyObject* p = p_;
    p_ = nullptr;
    return p;
  }
  explicit operator bool() const { return p_ != nullptr; }

 private:
  PyObject* p_ = nullptr;
};

// What replay_configure gives (owned for the life of the process).
struct Config {
  PyObject* kinds = nullptr;      // op_classes._kinds: func -> its call kind (a cache)
  PyObject* call_kind = nullptr;  // op_classes.call_kind
  PyObject* metadata = nullptr;   // METADATA_CALL
  PyObject* inplace = nullptr;    // INPLACE
  PyObject* diff = nullptr;       // replay.DIFF
  PyObject* identity = nullptr;   // replay.IDENTITY
  PyObject* nondiff = nullptr;    // replay.NONDIFF
  PyObject* plain_types = nullptr;  // pytree.PLAIN_TYPES (a frozenset of types)
  PyObject* size_type = nullptr;  // torch.Size
  PyObject* cut_float = nullptr;  // cuts.CutFloat
  PyObject* slot_type = nullptr;  // tape.Slot
  PyObject* forget = nullptr;     // tape._forget
  PyObject* partial = nullptr;    // functools.partial
  bool ready = false;
};
Config config;

// Interned attribute names.
PyObject *s_replay, *s_next_func, *s_watch, *s_tracked, *s_i, *s_plan, *s_differentiating, *s_grad_slot,
    *s_user_modes, *s_unseen, *s_key, *s_version, *s_ref, *s_slots, *s_versions, *s_step_consts, *s_out_refs,
    *s_serials, *s_after, *s_torch_function;

bool intern_names() {
  struct Name {
    PyObject** slot;
    const char* text;
  };
  const Name names[] = {{&s_replay, "replay"}, {&s_next_func, "next_func"}, {&s_watch, "watch"},
                        {&s_tracked, "tracked"}, {&s_i, "i"}, {&s_plan, "plan"},
                        {&s_differentiating, "differentiating"}, {&s_grad_slot, "grad_slot"},
                        {&s_user_modes, "user_modes"}, {&s_unseen, "unseen"}, {&s_key, "key"},
                        {&s_version, "version"}, {&s_ref, "ref"}, {&s_slots, "slots"},
                        {&s_versions, "versions"}, {&s_step_consts, "step_consts"}, {&s_out_refs, "out_refs"},
                        {&s_serials, "_serials"},
                        {&s_after, "_after"}, {&s_torch_function, "__torch_function__"}};
  for (const auto& n : names) {
    *n.slot = PyUnicode_InternFromString(n.text);
    if (*n.slot == nullptr) return false;
  }
  return true;
}

// -- small helpers ------------------------------------------------------------------------------

inline bool is_tensor(PyObject* o) { return THPVariable_Check(o); }

// id(o) as Python computes it.
inline Ref id_of(PyObject* o) { return Ref(PyLong_FromVoidPtr(o)); }

// 1: in, 0: not, -1: error
int id_in(PyObject* dict, PyObject* o) {
  Ref key = id_of(o);
  if (!key) return -1;
  return PyDict_Contains(dict, key.get());
}

// The slot of a tracked tensor (borrowed), or nullptr (with no error set) for an untracked one.
PyObject* slot_of(PyObject* tracked, PyObject* t) {
  Ref key = id_of(t);
  if (!key) return nullptr;
  return PyDict_GetItemWithError(tracked, key.get());
}

// Whether the base of a view is tracked: 1, 0, -1 (error).
int base_tracked(PyObject* tracked, const at::Tensor& t) {
  if (!t.is_view()) return 0;
  Ref base(THPVariable_Wrap(t._base()));
  if (!base) return -1;
  return id_in(tracked, base.get());
}

bool sizes_equal(PyObject* tuple, c10::IntArrayRef sizes) {
  if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != static_cast<Py_ssize_t>(sizes.size())) return false;
  for (size_t d = 0; d < sizes.size(); ++d) {
    PyObject* item = PyTuple_GET_ITEM(tuple, d);
    if (!PyLong_CheckExact(item)) return false;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow || v != sizes[d]) return false;
  }
  return true;
}

inline bool plain_shapes(const at::Tensor& t) {
  return t.defined() && !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() && t.layout() == c10::kStrided;
}

// (shape, dtype, device, strides) == what signature() recorded of a constant.
bool constant_matches(PyObject* s, const at::Tensor& t) {
  if (!PyTuple_CheckExact(s) || PyTuple_GET_SIZE(s) != 4 || !plain_shapes(t)) return false;
  PyObject* device = PyTuple_GET_ITEM(s, 2);
  return sizes_equal(PyTuple_GET_ITEM(s, 0), t.sizes()) &&
         PyTuple_GET_ITEM(s, 1) == reinterpret_cast<PyObject*>(torch::getTHPDtype(t.scalar_type())) &&
         THPDevice_Check(device) && reinterpret_cast<THPDevice*>(device)->device == t.device() &&
         sizes_equal(PyTuple_GET_ITEM(s, 3), t.strides());
}

// a == b as Python's ==: 1, 0, -1 (error)
inline int equal(PyObject* a, PyObject* b) { return PyObject_RichCompareBool(a, b, Py_EQ); }

// -- replay.matches --------------------------------------------------------------------------------

// matches(args, sig, tracked, consts) of replay.py, for a tuple or list of arguments: 1 (they match;
// their constant tensors appended to consts), 0 (they do not, or this code cannot tell), -1 (error).
int matches(PyObject* const* args, Py_ssize_t n, PyObject* sig, PyObject* tracked, PyObject* consts) {
  if (!PyTuple_CheckExact(sig) || PyTuple_GET_SIZE(sig) != n) return 0;
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* a = args[k];
    PyObject* s = PyTuple_GET_ITEM(sig, k);
    if (is_tensor(a)) {
      const at::Tensor& t = THPVariable_Unpack(a);
      PyObject* slot = slot_of(tracked, a);
      if (slot != nullptr) {
        Ref key(PyObject_GetAttr(slot, s_key));
        Ref version(PyObject_GetAttr(slot, s_version));
        if (!key || !version) return -1;
        int same = equal(key.get(), s);
        if (same != 1) return same;
        if (!PyLong_CheckExact(version.get()) || PyLong_AsLongLong(version.get()) != t._version()) return 0;
        continue;
      }
      if (PyErr_Occurred()) return -1;
      int in = base_tracked(tracked, t);
      if (in != 0) return in == 1 ? 0 : -1;
      if (!constant_matches(s, t)) return 0;
      if (PyList_Append(consts, a) < 0) return -1;
      continue;
    }
    PyTypeObject* type = Py_TYPE(a);
    if (type == &PyLong_Type || type == &PyFloat_Type || type == &PyBool_Type) {  // (type, value)
      if (!PyTuple_CheckExact(s) || PyTuple_GET_SIZE(s) != 2 ||
          PyTuple_GET_ITEM(s, 0) != reinterpret_cast<PyObject*>(type))
        return 0;
      int same = equal(PyTuple_GET_ITEM(s, 1), a);
      if (same != 1) return same;
    } else if (reinterpret_cast<PyObject*>(type) == config.size_type) {  // (torch.Size, tuple(a))
      if (!PyTuple_CheckExact(s) || PyTuple_GET_SIZE(s) != 2 || PyTuple_GET_ITEM(s, 0) != config.size_type ||
          !PyTuple_CheckExact(PyTuple_GET_ITEM(s, 1)))
        return 0;
      int same = equal(PyTuple_GET_ITEM(s, 1), a);
      if (same != 1) return same;
    } else if (type == &PyTuple_Type || type == &PyList_Type) {  // (type, signature of the items)
      if (!PyTuple_CheckExact(s) || PyTuple_GET_SIZE(s) != 2 ||
          PyTuple_GET_ITEM(s, 0) != reinterpret_cast<PyObject*>(type))
        return 0;
      PyObject* const* items = type == &PyTuple_Type ? &PyTuple_GET_ITEM(a, 0) : PySequence_Fast_ITEMS(a);
      int r = matches(items, Py_SIZE(a), PyTuple_GET_ITEM(s, 1), tracked, consts);
      if (r != 1) return r;
    } else {
      int plain = PySet_Contains(config.plain_types, reinterpret_cast<PyObject*>(type));
      if (plain != 1) return plain;  // not a plain value: this code cannot tell
      if (Py_TYPE(s) != type) return 0;
      int same = equal(s, a);
      if (same != 1) return same;
    }
  }
  return 1;
}

// -- the recorder's general path -------------------------------------------------------------------

// note_requiring_grad of ad/recording.py over n values.
int note_requiring_grad(PyObject* const* values, Py_ssize_t n, PyObject* watch) {
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* v = values[k];
    if (is_tensor(v)) {
      if (THPVariable_Unpack(v).requires_grad()) {
        Ref key = id_of(v);
        if (!key || PyDict_SetItem(watch, key.get(), v) < 0) return -1;
      }
    } else if (PyTuple_Check(v) || PyList_Check(v)) {
      PyObject* const* items = PyTuple_Check(v) ? &PyTuple_GET_ITEM(v, 0) : PySequence_Fast_ITEMS(v);
      if (note_requiring_grad(items, Py_SIZE(v), watch) < 0) return -1;
    }
  }
  return 0;
}

int note_call(PyObject* watch, PyObject* args, PyObject* kwargs) {
  if (watch == Py_None) return 0;
  if (!PyDict_Check(watch)) {
    PyErr_SetString(PyExc_TypeError, "zygote_torch replay: the recorder's watch is not a dict");
    return -1;
  }
  if (note_requiring_grad(&PyTuple_GET_ITEM(args, 0), PyTuple_GET_SIZE(args), watch) < 0) return -1;
  if (kwargs != nullptr) {
    Ref values(PyDict_Values(kwargs));
    if (!values) return -1;
    if (note_requiring_grad(PySequence_Fast_ITEMS(values.get()), PyList_GET_SIZE(values.get()), watch) < 0)
      return -1;
  }
  return 0;
}

// touches() of capture/recorder.py: 1, 0, or 2 (a value this code does not know: the Python path
// decides), -1 (error).
int touches(PyObject* const* values, Py_ssize_t n, PyObject* tracked) {
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* v = values[k];
    if (is_tensor(v)) {
      int in = id_in(tracked, v);
      if (in != 0) return in;
      in = base_tracked(tracked, THPVariable_Unpack(v));
      if (in != 0) return in;
    } else if (PyTuple_Check(v) || PyList_Check(v)) {
      PyObject* const* items = PyTuple_Check(v) ? &PyTuple_GET_ITEM(v, 0) : PySequence_Fast_ITEMS(v);
      int r = touches(items, Py_SIZE(v), tracked);
      if (r != 0) return r;
    } else if (reinterpret_cast<PyObject*>(Py_TYPE(v)) == config.cut_float) {
      return 1;
    } else {
      int plain = PySet_Contains(config.plain_types, reinterpret_cast<PyObject*>(Py_TYPE(v)));
      if (plain != 1) return plain < 0 ? -1 : 2;
    }
  }
  return 0;
}

// call_kind(func), from its cache where it is there (nullptr: an error).
Ref kind_of(PyObject* func) {
  PyObject* kind = PyDict_GetItemWithError(config.kinds, func);
  if (kind != nullptr) return Ref(Py_NewRef(kind));
  PyErr_Clear();  // not there, or an unhashable func: call_kind says
  return Ref(PyObject_CallOneArg(config.call_kind, func));
}

PyObject* call(PyObject* func, PyObject* args, PyObject* kwargs) { return PyObject_Call(func, args, kwargs); }

// type(recorder).__torch_function__(recorder, func, types, args, kwargs): the Python method.
PyObject* python_path(PyObject* recorder, PyObject* const* argv, Py_ssize_t n) {
  Ref m(PyObject_GetAttr(reinterpret_cast<PyObject*>(Py_TYPE(recorder)), s_torch_function));
  if (!m) return nullptr;
  PyObject* stack[5] = {recorder, nullptr, nullptr, nullptr, nullptr};
  for (Py_ssize_t k = 0; k < n && k < 4; ++k) stack[k + 1] = argv[k];
  return PyObject_Vectorcall(m.get(), stack, (n < 4 ? n : 4) + 1, nullptr);
}

// -- Replay.fast_step --------------------------------------------------------------------------

// Whether the recording's user grad mode differentiates a call made now (grad_mode.enabled_from).
int user_grad_enabled(PyObject* replay) {
  Ref slot(PyObject_GetAttr(replay, s_grad_slot));
  if (!slot) return -1;
  if (slot.get() == Py_None) return 1;
  Ref modes(PyObject_GetAttr(replay, s_user_modes));
  if (!modes) return -1;
  if (!PyList_Check(modes.get())) return 0;
  Py_ssize_t s = PyLong_AsSsize_t(slot.get());
  if (s < 0) return PyErr_Occurred() ? -1 : 0;
  Py_ssize_t n = PyList_GET_SIZE(modes.get());
  if (s >= n) return 0;
  for (Py_ssize_t k = s; k < n; ++k) {
    int on = PyObject_IsTrue(PyList_GET_ITEM(modes.get(), k));
    if (on != 1) return on;
  }
  return 1;
}

// The output's tensors, where it is a tensor or a tuple or list of tensors; false otherwise.
bool output_tensors(PyObject* out, std::vector<PyObject*>& outs) {
  if (THPVariable_CheckExact(out)) {
    outs.push_back(out);
    return true;
  }
  if (!PyTuple_CheckExact(out) && !PyList_CheckExact(out)) return false;
  PyObject* const* items = PyTuple_CheckExact(out) ? &PyTuple_GET_ITEM(out, 0) : PySequence_Fast_ITEMS(out);
  for (Py_ssize_t k = 0; k < Py_SIZE(out); ++k) {
    if (!THPVariable_CheckExact(items[k])) return false;
    outs.push_back(items[k]);
  }
  return true;
}

// _outputs_match: the shapes and dtypes the trace had, ((shape, dtype), ...).
bool outputs_match(const std::vector<PyObject*>& outs, PyObject* metas) {
  if (!PyTuple_CheckExact(metas) || PyTuple_GET_SIZE(metas) != static_cast<Py_ssize_t>(outs.size())) return false;
  for (size_t m = 0; m < outs.size(); ++m) {
    PyObject* meta = PyTuple_GET_ITEM(metas, m);
    const at::Tensor& t = THPVariable_Unpack(outs[m]);
    if (!PyTuple_CheckExact(meta) || PyTuple_GET_SIZE(meta) != 2 || !plain_shapes(t) ||
        PyTuple_GET_ITEM(meta, 1) != reinterpret_cast<PyObject*>(torch::getTHPDtype(t.scalar_type())) ||
        !sizes_equal(PyTuple_GET_ITEM(meta, 0), t.sizes()))
      return false;
  }
  return true;
}

// tensors_in((args, kwargs)) of capture/pytree.py.
void collect(PyObject* o, std::vector<PyObject*>& out) {
  if (is_tensor(o)) {
    out.push_back(o);
  } else if (PyTuple_Check(o) || PyList_Check(o)) {
    PyObject* const* items = PyTuple_Check(o) ? &PyTuple_GET_ITEM(o, 0) : PySequence_Fast_ITEMS(o);
    for (Py_ssize_t k = 0; k < Py_SIZE(o); ++k) collect(items[k], out);
  } else if (PyDict_Check(o)) {
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(o, &pos, &key, &value)) collect(value, out);
  }
}

int set_version(PyObject* versions, Py_ssize_t r, PyObject* t) {
  PyObject* v = PyLong_FromLongLong(THPVariable_Unpack(t)._version());
  if (v == nullptr) return -1;
  return PyList_SetItem(versions, r, v);  // steals v
}

// slots[r] = t and versions[r] = t._version, for the pairs (position, r) of `where` over `values`.
int stash(PyObject* replay, PyObject* where, PyObject* const* values, Py_ssize_t n_values) {
  if (PyTuple_GET_SIZE(where) == 0) return 0;
  Ref slots(PyObject_GetAttr(replay, s_slots));
  Ref versions(PyObject_GetAttr(replay, s_versions));
  if (!slots || !versions) return -1;
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(where); ++k) {
    PyObject* pair = PyTuple_GET_ITEM(where, k);
    Py_ssize_t m = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 0));
    Py_ssize_t r = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 1));
    if (m < 0 || m >= n_values || r < 0) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_IndexError, "zygote_torch replay: a slot out of range");
      return -1;
    }
    Py_INCREF(values[m]);
    if (PyList_SetItem(slots.get(), r, values[m]) < 0 || set_version(versions.get(), r, values[m]) < 0) return -1;
  }
  return 0;
}

// Tape.track_new(t) of a dynamic tape: tracked[id(t)] = Slot(next(tape._serials), t._version,
// weakref.ref(t, partial(_forget, tracked, id(t)))); the weak reference (nullptr: an error).
PyObject* track_new(PyObject* tracked, PyObject* serials, PyObject* t) {
  Ref key(PyIter_Next(serials));
  Ref id = id_of(t);
  if (!key || !id) return nullptr;
  Ref callback(PyObject_CallFunctionObjArgs(config.partial, config.forget, tracked, id.get(), nullptr));
  if (!callback) return nullptr;
  Ref ref(PyWeakref_NewRef(t, callback.get()));
  Ref version(PyLong_FromLongLong(THPVariable_Unpack(t)._version()));
  if (!ref || !version) return nullptr;
  PyTypeObject* type = reinterpret_cast<PyTypeObject*>(config.slot_type);
  Ref slot(type->tp_alloc(type, 0));  // Slot.__new__: its fields set below, as its __init__ does
  if (!slot || PyObject_SetAttr(slot.get(), s_key, key.get()) < 0 ||
      PyObject_SetAttr(slot.get(), s_version, version.get()) < 0 || PyObject_SetAttr(slot.get(), s_ref, ref.get()) < 0 ||
      PyDict_SetItem(tracked, id.get(), slot.get()) < 0)
    return nullptr;
  return ref.release();
}

enum Outcome { DONE = 1, PYTHON = 2, FAILED = -1 };

// The plan of a step (Program.plan, replay.py): (func, kind, has_keywords, sig, keyword names,
// keyword sig, out_meta, tracked positions, out slots, const slots, identity position).
enum PlanField { P_FUNC, P_KIND, P_HAS_KW, P_SIG, P_KW_NAMES, P_KW_SIG, P_OUT_META, P_TRACKED, P_OUT_SLOTS, P_CONST_SLOTS,
                 P_IDENTITY, P_FIELDS };

// Everything the check reads, before the call: PYTHON where the Python method must decide.
Outcome check(PyObject* recorder, PyObject* replay, PyObject* plan, Py_ssize_t i, PyObject* args, PyObject* kwargs,
              PyObject* tracked, PyObject* consts) {
  if (i == 0) return PYTHON;  // the inputs are checked there
  PyObject* kind = PyTuple_GET_ITEM(plan, P_KIND);
  if (kind != config.diff && kind != config.identity && kind != config.nondiff) return PYTHON;  // an in-place call on a constant
  Ref differentiating(PyObject_GetAttr(replay, s_differentiating));
  if (!differentiating) return FAILED;
  if (differentiating.get() != Py_True) return PYTHON;
  int enabled = user_grad_enabled(replay);
  if (enabled != 1) return enabled < 0 ? FAILED : PYTHON;
  Ref unseen(PyObject_GetAttr(replay, s_unseen));
  if (!unseen) return FAILED;
  if (unseen.get() != Py_None) return PYTHON;
  Ref watch(PyObject_GetAttr(recorder, s_watch));
  if (!watch || note_call(watch.get(), args, kwargs) < 0) return FAILED;
  bool has_kw = PyTuple_GET_ITEM(plan, P_HAS_KW) == Py_True;
  if (kwargs == nullptr) {
    if (has_kw) return PYTHON;
    int r = matches(&PyTuple_GET_ITEM(args, 0), PyTuple_GET_SIZE(args), PyTuple_GET_ITEM(plan, P_SIG), tracked, consts);
    return r == 1 ? DONE : r == 0 ? PYTHON : FAILED;
  }
  if (!has_kw) return PYTHON;
  PyObject* names = PyTuple_GET_ITEM(plan, P_KW_NAMES);
  if (!PyTuple_CheckExact(names) || PyTuple_GET_SIZE(names) != PyDict_GET_SIZE(kwargs)) return PYTHON;
  std::vector<PyObject*> values;
  Py_ssize_t pos = 0, k = 0;
  PyObject *key, *value;
  while (PyDict_Next(kwargs, &pos, &key, &value)) {
    int same = equal(key, PyTuple_GET_ITEM(names, k++));
    if (same != 1) return same < 0 ? FAILED : PYTHON;
    values.push_back(value);
  }
  int r = matches(&PyTuple_GET_ITEM(args, 0), PyTuple_GET_SIZE(args), PyTuple_GET_ITEM(plan, P_SIG), tracked, consts);
  if (r == 1) r = matches(values.data(), static_cast<Py_ssize_t>(values.size()), PyTuple_GET_ITEM(plan, P_KW_SIG),
                          tracked, consts);
  return r == 1 ? DONE : r == 0 ? PYTHON : FAILED;
}

// After the call: the outputs checked and noted, the replay moved on. PYTHON (with nothing
// changed) where Replay._after must do it.
Outcome finish(PyObject* replay, PyObject* plans, PyObject* plan, Py_ssize_t i, PyObject* args, PyObject* kwargs, PyObject* out,
               PyObject* tracked, PyObject* consts) {
  PyObject* kind = PyTuple_GET_ITEM(plan, P_KIND);
  std::vector<PyObject*> outs;
  PyObject* positions = PyTuple_GET_ITEM(plan, P_TRACKED);
  if (kind == config.diff) {
    if (!output_tensors(out, outs) || !outputs_match(outs, PyTuple_GET_ITEM(plan, P_OUT_META))) return PYTHON;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(positions); ++k) {
      Py_ssize_t m = PyLong_AsSsize_t(PyTuple_GET_ITEM(positions, k));
      if (m < 0 || m >= static_cast<Py_ssize_t>(outs.size())) return PyErr_Occurred() ? FAILED : PYTHON;
      int in = id_in(tracked, outs[m]);  // a value it was given
      if (in != 0) return in < 0 ? FAILED : PYTHON;
    }
  } else if (kind == config.identity) {
    std::vector<PyObject*> given;
    collect(args, given);
    if (kwargs != nullptr) collect(kwargs, given);
    Py_ssize_t j = PyLong_AsSsize_t(PyTuple_GET_ITEM(plan, P_IDENTITY));
    if (j < 0 || j >= static_cast<Py_ssize_t>(given.size()) || given[j] != out)
      return PyErr_Occurred() ? FAILED : PYTHON;
  }
  // Checked: from here on, the replay changes.
  if (kind == config.diff) {
    if (PyTuple_GET_SIZE(positions) > 0) {
      Ref refs(PyObject_GetAttr(replay, s_out_refs));
      Ref serials(PyObject_GetAttr(replay, s_serials));
      if (!refs || !serials) return FAILED;
      for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(positions); ++k) {
        PyObject* t = outs[PyLong_AsSsize_t(PyTuple_GET_ITEM(positions, k))];
        Ref ref(track_new(tracked, serials.get(), t));
        if (!ref || PyList_Append(refs.get(), ref.get()) < 0) return FAILED;
      }
    }
    if (stash(replay, PyTuple_GET_ITEM(plan, P_OUT_SLOTS), outs.data(), static_cast<Py_ssize_t>(outs.size())) < 0)
      return FAILED;
  }
  Ref step_consts(PyObject_GetAttr(replay, s_step_consts));
  if (!step_consts || PyList_Append(step_consts.get(), kind == config.diff ? consts : Py_None) < 0) return FAILED;
  if (stash(replay, PyTuple_GET_ITEM(plan, P_CONST_SLOTS), PySequence_Fast_ITEMS(consts), PyList_GET_SIZE(consts)) < 0)
    return FAILED;
  Py_ssize_t next = i + 1;
  PyObject* next_func = next < PyList_GET_SIZE(plans) ? PyTuple_GET_ITEM(PyList_GET_ITEM(plans, next), P_FUNC) : Py_None;
  Ref index(PyLong_FromSsize_t(next));
  if (!index || PyObject_SetAttr(replay, s_i, index.get()) < 0 ||
      PyObject_SetAttr(replay, s_next_func, next_func) < 0)
    return FAILED;
  return DONE;
}

// The trace's next call, checked, run and noted; PYTHON where Python must (nothing changed then).
Outcome fast_step(PyObject* recorder, PyObject* replay, PyObject* func, PyObject* args, PyObject* kwargs,
                  PyObject** result) {
  Ref index(PyObject_GetAttr(replay, s_i));
  Ref plans(PyObject_GetAttr(replay, s_plan));
  Ref tracked(PyObject_GetAttr(replay, s_tracked));
  if (!index || !plans || !tracked) return FAILED;
  if (!PyList_CheckExact(plans.get()) || !PyDict_Check(tracked.get())) return PYTHON;
  Py_ssize_t i = PyLong_AsSsize_t(index.get());
  if (i < 0 || i >= PyList_GET_SIZE(plans.get())) return PyErr_Occurred() ? FAILED : PYTHON;
  PyObject* plan = PyList_GET_ITEM(plans.get(), i);
  if (!PyTuple_CheckExact(plan) || PyTuple_GET_SIZE(plan) != P_FIELDS || PyTuple_GET_ITEM(plan, P_FUNC) != func)
    return PYTHON;
  Ref consts(PyList_New(0));
  if (!consts) return FAILED;
  Outcome checked = check(recorder, replay, plan, i, args, kwargs, tracked.get(), consts.get());
  if (checked != DONE) return checked;
  Ref out(call(func, args, kwargs));
  if (!out) return FAILED;
  Outcome done = finish(replay, plans.get(), plan, i, args, kwargs, out.get(), tracked.get(), consts.get());
  if (done == PYTHON) {  // Replay._after(func, args, kwargs, out, consts) checks and notes it
    Ref after(PyObject_GetAttr(replay, s_after));
    if (!after) return FAILED;
    PyObject* stack[5] = {func, args, kwargs != nullptr ? kwargs : Py_None, out.get(), consts.get()};
    Ref got(PyObject_Vectorcall(after.get(), stack, 5, nullptr));
    if (!got) return FAILED;
    *result = got.release();
    return DONE;
  }
  if (done == FAILED) return FAILED;
  *result = out.release();
  return DONE;
}

// -- the handler -------------------------------------------------------------------------------

// recorder.__torch_function__(func, types, args=(), kwargs=None)
PyObject* handle(PyObject* recorder, PyObject* const* argv, Py_ssize_t n) {
  if (!config.ready || n < 2 || n > 4 || (n > 2 && !PyTuple_CheckExact(argv[2])) ||
      (n > 3 && argv[3] != Py_None && !PyDict_CheckExact(argv[3])))
    return python_path(recorder, argv, n);
  PyObject* func = argv[0];
  PyObject* args = n > 2 ? argv[2] : nullptr;
  PyObject* kwargs = n > 3 && argv[3] != Py_None && PyDict_GET_SIZE(argv[3]) > 0 ? argv[3] : nullptr;
  Ref empty(args == nullptr ? PyTuple_New(0) : nullptr);
  if (args == nullptr) {
    if (!empty) return nullptr;
    args = empty.get();
  }
  try {
    Ref replay(PyObject_GetAttr(recorder, s_replay));
    if (!replay) return nullptr;
    Ref next_func(PyObject_GetAttr(replay.get(), s_next_func));
    if (!next_func) return nullptr;
    if (func == next_func.get()) {
      PyObject* result = nullptr;
      Outcome outcome = fast_step(recorder, replay.get(), func, args, kwargs, &result);
      if (outcome == DONE) return result;
      if (outcome == FAILED) return nullptr;
      return python_path(recorder, argv, n);
    }
    // Recorder.__torch_function__ (and WatchingRecorder's note of tensors requiring grad)
    Ref watch(PyObject_GetAttr(recorder, s_watch));
    if (!watch || note_call(watch.get(), args, kwargs) < 0) return nullptr;
    Ref kind_ref = kind_of(func);
    if (!kind_ref) return nullptr;
    PyObject* kind = kind_ref.get();
    if (kind == config.metadata) return call(func, args, kwargs);
    Ref tracked(PyObject_GetAttr(recorder, s_tracked));
    if (!tracked) return nullptr;
    if (tracked.get() != Py_None && kind != config.inplace && PyDict_Check(tracked.get())) {
      int t = touches(&PyTuple_GET_ITEM(args, 0), PyTuple_GET_SIZE(args), tracked.get());
      if (t == 0 && kwargs != nullptr) {
        Ref values(PyDict_Values(kwargs));
        if (!values) return nullptr;
        t = touches(PySequence_Fast_ITEMS(values.get()), PyList_GET_SIZE(values.get()), tracked.get());
      }
      if (t < 0) return nullptr;
      if (t == 0) return call(func, args, kwargs);
    }
    return python_path(recorder, argv, n);
  } catch (python_error& e) {
    e.restore();
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef handler_def = {"__torch_function__", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(handle)),
                           METH_FASTCALL, "The replay recorder's __torch_function__ (csrc/replay.cpp)."};

// tape._forget(tracked, i, ref): a tracked tensor died (its id may be reused): its slot goes.
PyObject* replay_forget(PyObject*, PyObject* const* argv, Py_ssize_t n) {
  if (n != 3 || !PyDict_Check(argv[0])) {
    PyErr_SetString(PyExc_TypeError, "replay_forget(tracked, i, ref)");
    return nullptr;
  }
  PyObject* slot = PyDict_GetItemWithError(argv[0], argv[1]);
  if (slot == nullptr) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  Py_INCREF(slot);
  Ref held(slot);
  Ref ref(PyObject_GetAttr(slot, s_ref));
  if (!ref) return nullptr;
  if (ref.get() == argv[2] && PyDict_DelItem(argv[0], argv[1]) < 0) return nullptr;
  Py_RETURN_NONE;
}

PyObject* replay_handler(PyObject*, PyObject* recorder) { return PyCFunction_New(&handler_def, recorder); }

PyObject* replay_configure(PyObject*, PyObject* dict) {
  if (!PyDict_Check(dict)) {
    PyErr_SetString(PyExc_TypeError, "replay_configure takes a dict");
    return nullptr;
  }
  if (s_replay == nullptr && !intern_names()) return nullptr;
  struct Field {
    PyObject** slot;
    const char* name;
  };
  const Field fields[] = {{&config.kinds, "kinds"}, {&config.call_kind, "call_kind"},
                          {&config.metadata, "metadata"}, {&config.inplace, "inplace"},
                          {&config.diff, "diff"}, {&config.identity, "identity"}, {&config.nondiff, "nondiff"},
                          {&config.plain_types, "plain_types"}, {&config.size_type, "size_type"},
                          {&config.cut_float, "cut_float"}, {&config.slot_type, "slot_type"},
                          {&config.forget, "forget"}, {&config.partial, "partial"}};
  for (const auto& f : fields) {
    PyObject* v = PyDict_GetItemString(dict, f.name);
    if (v == nullptr) {
      PyErr_Format(PyExc_KeyError, "replay_configure: %s", f.name);
      return nullptr;
    }
    Py_INCREF(v);
    Py_XSETREF(*f.slot, v);
  }
  if (!PyDict_Check(config.kinds) || !PyAnySet_Check(config.plain_types) || !PyType_Check(config.slot_type)) {
    PyErr_SetString(PyExc_TypeError, "replay_configure: kinds must be a dict, plain_types a set, slot_type a type");
    return nullptr;
  }
  config.ready = true;
  Py_RETURN_NONE;
}

}  // namespace

namespace zt {
PyMethodDef replay_methods[] = {
    {"replay_handler", replay_handler, METH_O,
     "replay_handler(recorder): the C++ __torch_function__ of zygote_torch's replay recorder, bound to it."},
    {"replay_configure", replay_configure, METH_O, "replay_configure(dict): the Python objects the replay compares."},
    {"replay_forget", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(replay_forget)), METH_FASTCALL,
     "replay_forget(tracked, i, ref): zygote_torch.ad.tape._forget, the weak-reference callback of a tracked tensor."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace zt
