// Host replay of one block of the CUDA log-prob forward (csrc/cuda/logprobs.cu) over each row: the same
// thread_moments / merge / row_stats code of logprobs_common.h, compiled for the host, with the block's
// reduction written as plain loops in the kernel's order (per warp a butterfly over shuffle offsets
// 16, 8, 4, 2, 1, each lane merging its partner into itself; then thread 0 merging warps 1..7 in turn).
//
// Usage: logprobs_block_replay <f32|bf16> <misalignment in elements> <vocab> <temperature>
// stdin: rows x vocab logits (raw little-endian float32 or bfloat16 bits); stdout: per row float32 lse, entropy.
// Each row is placed `misalignment` elements past a 16-byte boundary, as a row of a strided view would be.
#define RLHF_FAST_LOGPROBS_MATH_ONLY
#include "logprobs_common.h"

#include <bit>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

using rlhf_fast::logprobs::kThreads;
using rlhf_fast::logprobs::Moments;

struct BFloat16 {
  uint16_t bits;
  operator float() const { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }
};

Moments block_moments(const std::vector<Moments>& threads, float scale) {
  std::vector<Moments> lanes = threads;
  for (int offset = 16; offset > 0; offset >>= 1) {
    std::vector<Moments> next(kThreads);
    for (int i = 0; i < kThreads; ++i) next[i] = rlhf_fast::logprobs::merge(lanes[i], lanes[i ^ offset], scale);
    lanes = next;
  }
  Moments acc = lanes[0];
  for (int w = 1; w < kThreads / 32; ++w) acc = rlhf_fast::logprobs::merge(acc, lanes[32 * w], scale);
  return acc;
}

template <typename scalar_t>
int replay(int64_t misalignment, int64_t vocab, double temperature) {
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float scale = inv_t * rlhf_fast::logprobs::kLog2e;  // as the kernel computes them
  std::vector<unsigned char> storage((vocab + 16) * sizeof(scalar_t) + 32);
  auto base = reinterpret_cast<uintptr_t>(storage.data());
  base = (base + 15) / 16 * 16;
  auto* row = reinterpret_cast<scalar_t*>(base) + misalignment;
  std::vector<Moments> threads(kThreads);
  while (std::fread(row, sizeof(scalar_t), vocab, stdin) == static_cast<size_t>(vocab)) {
    for (int thread = 0; thread < kThreads; ++thread) {
      threads[thread] = rlhf_fast::logprobs::thread_moments(row, vocab, thread, scale);
    }
    const auto stats = rlhf_fast::logprobs::row_stats(block_moments(threads, scale), inv_t);
    const float out[2] = {stats.lse, stats.entropy};
    std::fwrite(out, sizeof(float), 2, stdout);
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s <f32|bf16> <misalignment> <vocab> <temperature>\n", argv[0]);
    return 2;
  }
  const std::string dtype = argv[1];
  const int64_t misalignment = std::atoll(argv[2]), vocab = std::atoll(argv[3]);
  const double temperature = std::atof(argv[4]);
  if (dtype == "f32") return replay<float>(misalignment, vocab, temperature);
  if (dtype == "bf16") return replay<BFloat16>(misalignment, vocab, temperature);
  std::fprintf(stderr, "dtype must be f32 or bf16\n");
  return 2;
}
