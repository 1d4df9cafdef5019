/* The x86-64-v3 build of the native sampler (setup.py); see _fastsample.c. */
#define MODULE_NAME _fastsample_v3
#include "_fastsample.c"
