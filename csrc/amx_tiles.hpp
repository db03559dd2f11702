// AMX tiles (Intel Sapphire Rapids and later) for the bfloat16 tile kernel: both products of a
// key block as tdpbf16ps, 16 x 16 float32 results from 16 x 32 bfloat16 A tiles and B tiles in
// VNNI pairs, one instruction doing 16 x 16 x 32 multiply-adds (16x an AVX-512 FMA's).
//
// The kernel's score block stays S^T (a row per key, the tile's queries along it; see
// tile_kernel.hpp), which suits AMX as it is:
//   S^T = K Q^T:   C 16 keys x 16 queries, A = 16 K rows of 32 features read in place (k padded
//                  to a multiple of 32 features), B = the packed query pairs (qp) as they are.
//   O^T += V^T P^T: C 16 value columns x 16 queries, A = 16 rows of V^T (v packed transposed,
//                  keys along a row), B = P^T in pairs of keys (pp) as the vdpbf16ps path has it.
// Every tile is 16 rows of 64 bytes (palette 1); tiles 0-3 hold a 2 x 2 block of C, 4-5 A, 6-7 B,
// so each A and B tile loaded serves two products.
//
// FASTATTN_AMX_EMULATE replaces the instructions by plain C++ on thread-local tile registers, so
// that the kernel's layouts (strides, pairs, padding) are tested on a CPU without AMX; only a CPU
// with AMX measures its speed.
#pragma once

#include <cstdint>
#include <cstring>

#if !defined(FASTATTN_AMX_EMULATE)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastattn {
namespace FASTATTN_ISA_NS {
namespace amx {

constexpr int kRows = 16;   // rows of every tile
constexpr int kBytes = 64;  // bytes of a tile row: 16 float32 or 32 bfloat16 (16 pairs)

// The tile configuration (the LDTILECFG operand): palette 1, tiles 0-7 all 16 x 64 bytes.
struct alignas(64) Config {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  Config() {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = kBytes;
      rows[t] = kRows;
    }
  }
};

// The tile instructions take tile numbers as immediates (GCC's intrinsics paste them into the
// assembly), so they are used through macros with literal numbers.
#if defined(FASTATTN_AMX_EMULATE)
struct Registers {
  alignas(64) unsigned char t[8][kRows][kBytes];
};
inline Registers& regs() {
  static thread_local Registers r;
  return r;
}
inline void configure() {}
inline void release() {}
inline void emu_zero(int t) { std::memset(regs().t[t], 0, sizeof regs().t[t]); }
inline void emu_load(int t, const void* base, int64_t stride_bytes) {
  for (int r = 0; r < kRows; ++r)
    std::memcpy(regs().t[t][r], static_cast<const char*>(base) + r * stride_bytes, kBytes);
}
inline void emu_store(int t, void* base, int64_t stride_bytes) {
  for (int r = 0; r < kRows; ++r)
    std::memcpy(static_cast<char*>(base) + r * stride_bytes, regs().t[t][r], kBytes);
}
inline float emu_bf16(const unsigned char* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// C[m][n] += sum_k A[m][2k] B[k][n][0] + A[m][2k + 1] B[k][n][1], as tdpbf16ps.
inline void emu_dp(int tc, int ta, int tb) {
  Registers& g = regs();
  for (int m = 0; m < kRows; ++m)
    for (int n = 0; n < kBytes / 4; ++n) {
      float c;
      std::memcpy(&c, &g.t[tc][m][4 * n], 4);
      for (int k = 0; k < kRows; ++k)
        c += emu_bf16(&g.t[ta][m][4 * k]) * emu_bf16(&g.t[tb][k][4 * n]) +
             emu_bf16(&g.t[ta][m][4 * k + 2]) * emu_bf16(&g.t[tb][k][4 * n + 2]);
      std::memcpy(&g.t[tc][m][4 * n], &c, 4);
    }
}
#define FASTATTN_TILE_ZERO(t) emu_zero(t)
#define FASTATTN_TILE_LOAD(t, base, stride) emu_load(t, base, stride)
#define FASTATTN_TILE_STORE(t, base, stride) emu_store(t, base, stride)
#define FASTATTN_TILE_DP(c, a, b) emu_dp(c, a, b)
#else
inline void configure() {
  static const Config config;
  _tile_loadconfig(&config);
}
inline void release() { _tile_release(); }
#define FASTATTN_TILE_ZERO(t) _tile_zero(t)
#define FASTATTN_TILE_LOAD(t, base, stride) _tile_loadd(t, base, stride)
#define FASTATTN_TILE_STORE(t, base, stride) _tile_stored(t, base, stride)
#define FASTATTN_TILE_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#endif

// A thread's tiles, configured while it lives (LDTILECFG once per thread and kernel run).
struct Session {
  Session() { configure(); }
  ~Session() { release(); }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
};

// C (2 x 2 tiles of 16 x 16 float32 at c, row stride ldc bytes, tiles 16 rows and 64 bytes
// apart) (+)= sum over `chunks` of A (2 tiles of 16 rows at a, the second a_next bytes after
// the first, rows lda bytes apart, a chunk a_step bytes on) times B (2 tiles at b, 64 bytes
// apart, rows ldb bytes apart, a chunk b_step bytes on). Without accumulate C starts at 0.
template <bool kAccumulate>
inline void block_2x2(char* c, int64_t ldc, int64_t c_next, const char* a, int64_t lda,
                      int64_t a_next, int64_t a_step, const char* b, int64_t ldb, int64_t b_step,
                      int64_t chunks) {
  if (kAccumulate) {
    FASTATTN_TILE_LOAD(0, c, ldc);
    FASTATTN_TILE_LOAD(1, c + kBytes, ldc);
    FASTATTN_TILE_LOAD(2, c + c_next, ldc);
    FASTATTN_TILE_LOAD(3, c + c_next + kBytes, ldc);
  } else {
    FASTATTN_TILE_ZERO(0);
    FASTATTN_TILE_ZERO(1);
    FASTATTN_TILE_ZERO(2);
    FASTATTN_TILE_ZERO(3);
  }
  for (int64_t s = 0; s < chunks; ++s) {
    FASTATTN_TILE_LOAD(4, a + s * a_step, lda);
    FASTATTN_TILE_LOAD(5, a + a_next + s * a_step, lda);
    FASTATTN_TILE_LOAD(6, b + s * b_step, ldb);
    FASTATTN_TILE_LOAD(7, b + kBytes + s * b_step, ldb);
    FASTATTN_TILE_DP(0, 4, 6);
    FASTATTN_TILE_DP(1, 4, 7);
    FASTATTN_TILE_DP(2, 5, 6);
    FASTATTN_TILE_DP(3, 5, 7);
  }
  FASTATTN_TILE_STORE(0, c, ldc);
  FASTATTN_TILE_STORE(1, c + kBytes, ldc);
  FASTATTN_TILE_STORE(2, c + c_next, ldc);
  FASTATTN_TILE_STORE(3, c + c_next + kBytes, ldc);
}

#undef FASTATTN_TILE_ZERO
#undef FASTATTN_TILE_LOAD
#undef FASTATTN_TILE_STORE
#undef FASTATTN_TILE_DP

}  // namespace amx
}  // namespace FASTATTN_ISA_NS
}  // namespace fastattn
