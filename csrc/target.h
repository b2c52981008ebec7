// The namespace of code compiled under one ISA's flags (google/highway's HWY_NAMESPACE).
// A kernel translation unit defines CPUATTN_TARGET, its ISA's name, before any include and
// puts its code in cpuattn::CPUATTN_TARGET, an inline namespace (cpuattn::name still finds
// what is in it); every other translation unit gets `baseline`.
//
// Why: an inline function or a template instantiation with external linkage is a weak symbol,
// and the linker keeps one copy of it for the whole library. Were convert.h's helpers plain
// `inline` functions, the copy compiled with AVX-512 in a kernel object could be the one the
// baseline driver calls, and fault on a CPU without AVX-512. So everything compiled under ISA
// flags lives in cpuattn::CPUATTN_TARGET (one name per ISA: distinct symbols that say which
// ISA they are in a profile) and in an anonymous namespace there (local to its object file):
// the kernel bodies (tile_step.inl with the simd.inl, epilogue.inl, portable_set.inl and
// exp.h it includes; bf16_step.inl, amx_step.inl) and the helpers of headers shared with the
// baseline code (convert.h). The other headers a kernel includes define no functions: types.h,
// tiles.h and kernels/kernel.h hold types, constants and declarations only. .ci/check_symbols
// checks that a kernel object exports nothing but its KernelSet.
#pragma once

#ifndef CPUATTN_TARGET
#define CPUATTN_TARGET baseline
#define CPUATTN_TARGET_IS_BASELINE 1
#endif
