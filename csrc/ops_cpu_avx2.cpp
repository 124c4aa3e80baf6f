// The CPU kernels of ops_cpu_kernels.h compiled for AVX2 + FMA + F16C (chosen at run time by
// cpu_kernels() in ops_cpu.cpp; compiled out where the compiler is not GCC on x86-64).
#define ZT_ISA_AVX2
#include "ops_cpu_kernels.h"
