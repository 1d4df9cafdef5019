/* The x86-64-v4 build of the native sampler (setup.py); see _fastsample.c. */
#define MODULE_NAME _fastsample_v4
#include "_fastsample.c"
