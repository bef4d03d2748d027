// RLHF_FAST_SIMD_CLONES compiles a CPU hot loop three times, for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and
// baseline x86-64, and lets the loader pick the best the machine has: the extension itself is built for
// baseline x86-64, so without it the loops vectorise only 4 floats wide. GCC's target_clones needs ifunc
// support (glibc); elsewhere the macro is empty and the baseline loop runs.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RLHF_FAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLHF_FAST_SIMD_CLONES
#endif
