# TensorRT for the host, optional: NvInfer.h + libnvinfer (full TensorRT) or libtensorrt_rtx
# (TensorRT-RTX; same API, XP_TRT_RTX defined) + the CUDA runtime. Searched under
# -DXP_TENSORRT_ROOT=DIR (include/, lib/), $TENSORRT_ROOT and the system paths. Sets XP_HAVE_TRT
# and prints whether the backend is built.
option(XP_WITH_TENSORRT "build the TensorRT backend when TensorRT is found" ON)
set(XP_TENSORRT_ROOT "$ENV{TENSORRT_ROOT}" CACHE PATH "TensorRT or TensorRT-RTX install (include/, lib/)")
set(XP_HAVE_TRT OFF)
if(XP_WITH_TENSORRT)
  find_package(CUDAToolkit QUIET)
  find_path(XP_TRT_INCLUDE NvInfer.h HINTS "${XP_TENSORRT_ROOT}" PATH_SUFFIXES include include/x86_64-linux-gnu)
  find_library(XP_TRT_LIB NAMES tensorrt_rtx nvinfer HINTS "${XP_TENSORRT_ROOT}" PATH_SUFFIXES lib lib64)
  if(XP_TRT_INCLUDE AND XP_TRT_LIB AND CUDAToolkit_FOUND)
    set(XP_HAVE_TRT ON)
    get_filename_component(_n "${XP_TRT_LIB}" NAME)
    if(_n MATCHES "tensorrt_rtx")
      set(XP_TRT_FLAVOUR tensorrt_rtx)
    else()
      set(XP_TRT_FLAVOUR tensorrt)
    endif()
    message(STATUS "xp: TensorRT backend: built (${XP_TRT_FLAVOUR}: ${XP_TRT_INCLUDE}, ${XP_TRT_LIB})")
  else()
    message(STATUS "xp: TensorRT backend: NOT built (NvInfer.h: ${XP_TRT_INCLUDE}; library: ${XP_TRT_LIB}; "
                   "CUDA runtime found: ${CUDAToolkit_FOUND}). Pass -DXP_TENSORRT_ROOT=DIR to build it; "
                   "the host runs ONNX Runtime only and refuses plans with a clear error")
  endif()
else()
  message(STATUS "xp: TensorRT backend: NOT built (XP_WITH_TENSORRT=OFF)")
endif()
