// The CPU kernels of ops_cpu_kernels.h compiled for AVX512 F/BW/VL/DQ (chosen at run time by
// cpu_kernels() in ops_cpu.cpp; compiled out where the compiler is not GCC on x86-64).
#define ZT_ISA_AVX512
#include "ops_cpu_kernels.h"
