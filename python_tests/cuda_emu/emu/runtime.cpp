// The emulator's scheduler: blocks one after another, each CUDA thread a ucontext fiber,
// __syncthreads a barrier over the block's fibers (see cuda_emu.h for the model).
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define S2META_EMU_ASAN 1
#else
#define S2META_EMU_ASAN 0
#endif

// c10's CPU allocator fills fresh allocations with junk when this flag is set: outputs a kernel
// forgets to write (at::empty) then differ from the reference instead of holding stale values.
extern bool FLAGS_caffe2_cpu_allocator_do_junk_fill;

namespace s2meta_emu {

Builtins& builtins() {
  static Builtins b;
  return b;
}

DeviceLimits& limits() {
  static DeviceLimits l;
  return l;
}

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per fiber; sanitizer frames are large
constexpr unsigned char kJunk = 0xFF;       // NaN in float and double, -1 in integers

enum class Schedule { kForward, kReverse, kShuffle };

struct Fiber {
  ucontext_t context;
  unsigned char* stack = nullptr;  // kStackBytes usable, a guard page below
  bool started = false;
  bool done = false;
  bool waiting = false;
  const char* wait_file = nullptr;
  int wait_line = 0;
  unsigned tid = 0;
  void* fake_stack = nullptr;
};

struct State {
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;
  std::mt19937_64 rng;
  std::map<const void*, int> optin;  // kernel -> cudaFuncAttributeMaxDynamicSharedMemorySize
  cudaError_t last_error = cudaSuccess;
  std::string error_detail;
  std::map<std::string, bool> mutants;
  std::map<std::string, std::pair<std::unique_ptr<int>, int>> knobs;  // value, the source's default
  int64_t launches = 0, blocks = 0, barriers = 0;

  // The block being run.
  std::vector<Fiber> fibers;  // grows to the largest block seen; stacks are reused
  ucontext_t scheduler;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* body_context = nullptr;
  std::unique_ptr<unsigned char[]> dynamic;  // exactly the launch's dynamic shared bytes
  size_t dynamic_bytes = 0;
  std::map<std::pair<const char*, int>, std::pair<std::unique_ptr<unsigned char[]>, size_t>> statics;
  size_t static_bytes = 0;
  std::string fault;  // set inside a block: the launch fails once the block is unwound
};

State& state() {
  static State s;
  return s;
}

[[noreturn]] void fatal(const std::string& message) {
  std::fprintf(stderr, "cuda_emu: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

void start_switch(void** fake_stack_save, const void* bottom, size_t size) {
#if S2META_EMU_ASAN
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
  (void)fake_stack_save, (void)bottom, (void)size;
#endif
}

void finish_switch(void* fake_stack_save, const void** bottom_old, size_t* size_old) {
#if S2META_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack_save, bottom_old, size_old);
#else
  (void)fake_stack_save, (void)bottom_old, (void)size_old;
#endif
}

void fiber_entry() {
  State& s = state();
  finish_switch(nullptr, &s.scheduler_stack_bottom, &s.scheduler_stack_size);
  s.body(s.body_context);
  Fiber* f = s.current;
  f->done = true;
  // A finished fiber's fake stack dies with it (null save slot), then control returns for good.
  start_switch(nullptr, s.scheduler_stack_bottom, s.scheduler_stack_size);
  swapcontext(&f->context, &s.scheduler);
  fatal("a finished fiber was resumed");
}

void resume(Fiber& f) {
  State& s = state();
  s.current = &f;
  builtins().thread_idx = uint3{f.tid % builtins().block_dim.x, (f.tid / builtins().block_dim.x) % builtins().block_dim.y,
                                f.tid / (builtins().block_dim.x * builtins().block_dim.y)};
  void* scheduler_fake = nullptr;
  start_switch(&scheduler_fake, f.stack, kStackBytes);
  if (swapcontext(&s.scheduler, &f.context) != 0) fatal("swapcontext failed");
  finish_switch(scheduler_fake, nullptr, nullptr);
  s.current = nullptr;
}

void prepare_fibers(unsigned count) {
  State& s = state();
  const long page = sysconf(_SC_PAGESIZE);
  while (s.fibers.size() < count) {
    Fiber f;
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) fatal("cannot map a fiber stack");
    mprotect(mem, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
    f.stack = static_cast<unsigned char*>(mem) + page;
    s.fibers.push_back(f);
  }
  for (unsigned t = 0; t < count; ++t) {
    Fiber& f = s.fibers[t];
#if S2META_EMU_ASAN
    // A fiber abandoned mid-kernel (a fault) leaves poisoned frames behind; one that returned
    // has had its frames unpoisoned on the way out.
    if (f.started && !f.done) __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
    f.started = true;
    f.done = f.waiting = false;
    f.wait_file = nullptr;
    f.wait_line = 0;
    f.tid = t;
    f.fake_stack = nullptr;
    if (getcontext(&f.context) != 0) fatal("getcontext failed");
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
}

std::vector<unsigned> order(unsigned count) {
  State& s = state();
  std::vector<unsigned> o(count);
  for (unsigned t = 0; t < count; ++t) o[t] = t;
  if (s.schedule == Schedule::kReverse) std::reverse(o.begin(), o.end());
  if (s.schedule == Schedule::kShuffle) std::shuffle(o.begin(), o.end(), s.rng);
  return o;
}

std::string site(const char* file, int line) {
  const char* base = file ? std::strrchr(file, '/') : nullptr;
  return std::string(base ? base + 1 : (file ? file : "?")) + ":" + std::to_string(line);
}

// Runs one block to completion; returns false (with s.fault set) on a barrier misuse.
bool run_block(unsigned count) {
  State& s = state();
  prepare_fibers(count);
  s.dynamic.reset(new unsigned char[s.dynamic_bytes > 0 ? s.dynamic_bytes : 1]);
  std::memset(s.dynamic.get(), kJunk, s.dynamic_bytes);
  s.statics.clear();
  s.static_bytes = 0;
  for (;;) {
    for (unsigned t : order(count)) {
      Fiber& f = s.fibers[t];
      if (!f.done && !f.waiting) resume(f);
      if (!s.fault.empty()) return false;
    }
    unsigned waiting = 0, done = 0;
    const Fiber* first_waiting = nullptr;
    for (unsigned t = 0; t < count; ++t) {
      const Fiber& f = s.fibers[t];
      if (f.waiting) {
        if (first_waiting == nullptr) first_waiting = &f;
        ++waiting;
        if (f.wait_line != first_waiting->wait_line || std::strcmp(f.wait_file, first_waiting->wait_file) != 0) {
          s.fault = "divergent __syncthreads: thread " + std::to_string(first_waiting->tid) + " waits at " +
                    site(first_waiting->wait_file, first_waiting->wait_line) + ", thread " + std::to_string(f.tid) +
                    " at " + site(f.wait_file, f.wait_line);
          return false;
        }
      }
      if (f.done) ++done;
    }
    if (waiting == 0) return true;
    if (done > 0) {
      s.fault = "__syncthreads at " + site(first_waiting->wait_file, first_waiting->wait_line) +
                " is not reached by every thread of the block (" + std::to_string(done) + " of " +
                std::to_string(count) + " threads returned first)";
      return false;
    }
    ++s.barriers;
    for (unsigned t = 0; t < count; ++t) s.fibers[t].waiting = false;
  }
}

const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t fail(cudaError_t e, const std::string& detail) {
  State& s = state();
  s.last_error = e;
  s.error_detail = detail;
  return e;
}

}  // namespace

cudaError_t set_func_shared_optin(const void* kernel, int bytes) {
  if (mutant("ignore_shared_optin")) return cudaSuccess;  // the launcher's opt-in goes missing
  if (bytes < 0 || static_cast<size_t>(bytes) > limits().shared_optin) {
    return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(bytes) +
                                           " bytes of dynamic shared memory exceed the device's opt-in limit of " +
                                           std::to_string(limits().shared_optin));
  }
  state().optin[kernel] = bytes;
  return cudaSuccess;
}

cudaError_t check_launch(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    return fail(cudaErrorInvalidConfiguration,
                "launch of grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                    std::to_string(grid.z) + ") x block (" + std::to_string(block.x) + ", " + std::to_string(block.y) +
                    ", " + std::to_string(block.z) + ")");
  }
  const auto it = state().optin.find(kernel);
  const size_t allowed = it == state().optin.end() ? limits().shared_default : static_cast<size_t>(it->second);
  if (shared_bytes > std::max(allowed, limits().shared_default)) {
    return fail(cudaErrorInvalidValue, "launch asks for " + std::to_string(shared_bytes) +
                                           " bytes of dynamic shared memory but the kernel may use " +
                                           std::to_string(std::max(allowed, limits().shared_default)) +
                                           (it == state().optin.end() ? " (no cudaFuncAttributeMaxDynamicSharedMemorySize opt-in)" : ""));
  }
  return cudaSuccess;
}

void run_grid(dim3 grid, dim3 block, size_t shared_bytes, void (*body)(void*), void* context) {
  State& s = state();
  if (s.current != nullptr) fatal("a kernel launched another kernel (dynamic parallelism is not modelled)");
  ++s.launches;
  s.body = body;
  s.body_context = context;
  s.dynamic_bytes = shared_bytes;
  s.fault.clear();
  builtins().grid_dim = grid;
  builtins().block_dim = block;
  const unsigned count = block.x * block.y * block.z;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        builtins().block_idx = uint3{x, y, z};
        ++s.blocks;
        if (!run_block(count)) {
          const std::string fault = s.fault;
          s.fault.clear();
          s.dynamic.reset();
          s.statics.clear();
          TORCH_CHECK(false, "cuda_emu: block (", x, ", ", y, ", ", z, "): ", fault);
        }
      }
    }
  }
  s.dynamic.reset();
  s.statics.clear();
}

void syncthreads(const char* file, int line) {
  State& s = state();
  Fiber* f = s.current;
  if (f == nullptr) fatal("__syncthreads outside a kernel");
  f->waiting = true;
  f->wait_file = file;
  f->wait_line = line;
  start_switch(&f->fake_stack, s.scheduler_stack_bottom, s.scheduler_stack_size);
  swapcontext(&f->context, &s.scheduler);
  finish_switch(f->fake_stack, &s.scheduler_stack_bottom, &s.scheduler_stack_size);
}

void* dynamic_shared() {
  State& s = state();
  if (s.current == nullptr) fatal("dynamic shared memory outside a kernel");
  return s.dynamic.get();
}

void* static_shared(const char* file, int line, size_t bytes) {
  State& s = state();
  if (s.current == nullptr) fatal("shared memory outside a kernel");
  auto& slot = s.statics[{file, line}];
  if (!slot.first) {
    s.static_bytes += bytes;
    if (s.static_bytes > limits().shared_default || s.static_bytes + s.dynamic_bytes > limits().shared_optin) {
      s.fault = "static shared memory at " + site(file, line) + " brings the block to " +
                std::to_string(s.static_bytes) + " static + " + std::to_string(s.dynamic_bytes) +
                " dynamic bytes, over the device's limit";
      // The fiber cannot return an error; give it a valid buffer and let the scheduler fail the launch.
    }
    slot.first.reset(new unsigned char[bytes]);
    slot.second = bytes;
    std::memset(slot.first.get(), kJunk, bytes);
  } else if (slot.second != bytes) {
    fatal("one __shared__ declaration with two sizes in a block");
  }
  return slot.first.get();
}

bool mutant(const char* name) {
  const auto& m = state().mutants;
  const auto it = m.find(name);
  return it != m.end() && it->second;
}

const int& knob(const char* name, int fallback) {
  auto& slot = state().knobs[name];
  if (!slot.first) slot = {std::make_unique<int>(fallback), fallback};
  return *slot.first;
}

cudaError_t get_last_error() {
  State& s = state();
  const cudaError_t e = s.last_error;
  s.last_error = cudaSuccess;
  return e;
}

const char* error_string(cudaError_t e) {
  static std::string text;
  text = error_name(e);
  if (e != cudaSuccess && !state().error_detail.empty()) text += " (cuda_emu: " + state().error_detail + ")";
  return text.c_str();
}

namespace {

// Control surface for the tests: torch.ops.s2meta_emu_ctl.*
void configure(const std::string& schedule, int64_t seed, int64_t shared_optin_bytes) {
  State& s = state();
  if (schedule == "forward") s.schedule = Schedule::kForward;
  else if (schedule == "reverse") s.schedule = Schedule::kReverse;
  else if (schedule == "shuffle") s.schedule = Schedule::kShuffle;
  else TORCH_CHECK(false, "cuda_emu: schedule must be forward, reverse or shuffle, got ", schedule);
  s.seed = static_cast<uint64_t>(seed);
  s.rng.seed(s.seed);
  limits().shared_optin = static_cast<size_t>(shared_optin_bytes);
  s.optin.clear();
  s.last_error = cudaSuccess;
  for (auto& [name, slot] : s.knobs) *slot.first = slot.second;  // every grid cap back to the source's value
}

void set_mutant(const std::string& name, bool on) { state().mutants[name] = on; }

void set_knob(const std::string& name, int64_t value) {
  const auto it = state().knobs.find(name);
  TORCH_CHECK(it != state().knobs.end(), "cuda_emu: no knob named ", name, " (knobs are created when their file is loaded)");
  *it->second.first = static_cast<int>(value);
}

std::vector<int64_t> counters() {
  const State& s = state();
  return {s.launches, s.blocks, s.barriers};
}

struct JunkFill {
  JunkFill() { FLAGS_caffe2_cpu_allocator_do_junk_fill = true; }
} junk_fill;

}  // namespace

TORCH_LIBRARY(s2meta_emu_ctl, m) {
  m.def("configure", &configure);
  m.def("set_mutant", &set_mutant);
  m.def("set_knob", &set_knob);
  m.def("counters", &counters);
}

}  // namespace s2meta_emu
