/* A stand-in for the CUDA driver (libcuda.so.1) on a host without a GPU, for experiments/sass.py and
   experiments/xla_kernels.py: it answers the queries that Mosaic GPU's compile entry point (MosaicGpuCompile,
   in jax's CUDA plugin) makes before it compiles, as an sm_90 device would, so that the plugin lowers a
   kernel to PTX and runs ptxas and nvdisasm on it; loading the compiled module then fails, as it must
   without a GPU. It also defines the two host functions that a compiled Mosaic GPU kernel's host code calls
   (they live in jax's CUDA runtime extension, absent here), so that XLA's compile for a GPU it does not have
   links that code; nothing calls them. Built by sass.py with the host's C compiler. Set CUDASHIM_TRACE=1 to
   see which driver calls arrive. */
#include <stdio.h>
#include <stdlib.h>

typedef int CUresult;
typedef int CUdevice;

enum { CUDA_SUCCESS = 0, CUDA_ERROR_NO_DEVICE = 100 };
enum { MULTIPROCESSOR_COUNT = 16, COMPUTE_CAPABILITY_MAJOR = 75, COMPUTE_CAPABILITY_MINOR = 76 };

static CUresult traced(const char *name, CUresult result) {
  if (getenv("CUDASHIM_TRACE")) fprintf(stderr, "[cuda_shim] %s -> %d\n", name, result);
  return result;
}

CUresult cuInit(unsigned flags) { return traced("cuInit", CUDA_SUCCESS); }
CUresult cuDriverGetVersion(int *version) { *version = 13000; return traced("cuDriverGetVersion", CUDA_SUCCESS); }
CUresult cuDeviceGet(CUdevice *device, int ordinal) { *device = 0; return traced("cuDeviceGet", CUDA_SUCCESS); }
CUresult cuDeviceGetCount(int *count) { *count = 1; return traced("cuDeviceGetCount", CUDA_SUCCESS); }
CUresult cuCtxGetDevice(CUdevice *device) { *device = 0; return traced("cuCtxGetDevice", CUDA_SUCCESS); }

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
  switch (attribute) {
    case COMPUTE_CAPABILITY_MAJOR: *value = 9; break;
    case COMPUTE_CAPABILITY_MINOR: *value = 0; break;
    case MULTIPROCESSOR_COUNT: *value = 132; break;
    default: *value = 0;
  }
  return traced("cuDeviceGetAttribute", CUDA_SUCCESS);
}

CUresult cuGetErrorString(CUresult error, const char **text) {
  *text = "no GPU on this host (experiments/cuda_shim.c)";
  return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult error, const char **text) {
  *text = "CUDA_ERROR_NO_DEVICE";
  return CUDA_SUCCESS;
}

CUresult cuModuleLoadData(void **module, const void *image) {
  return traced("cuModuleLoadData", CUDA_ERROR_NO_DEVICE);
}

CUresult cuModuleLoadDataEx(void **module, const void *image, unsigned n, void *options, void **values) {
  return traced("cuModuleLoadDataEx", CUDA_ERROR_NO_DEVICE);
}

/* The Mosaic GPU runtime's host entry points, never called on a host without a GPU. */
void mosaic_gpu_init_tma_desc(void) {}
void mosaic_gpu_launch_kernel(void) {}
