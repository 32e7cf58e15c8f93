# ONNX Runtime for the host: the C API header at build time, the library at run time (dlopen).
#
# Header: -DXP_ORT_INCLUDE_DIR=DIR, else a system install (/usr/include/onnxruntime, e.g. Debian
# trixie's libonnxruntime-dev), else (XP_FETCH_ORT_HEADERS=ON) cmake/ort_headers.sh downloads
# trixie's libonnxruntime-dev .deb into the build folder with apt-get download.
# Library: -DXP_ORT_LIBRARY=FILE, else the system's libonnxruntime.so, else the onnxruntime Python
# wheel of Python3_EXECUTABLE (onnxruntime/capi/libonnxruntime.so.1.x). Its path becomes the
# default the host dlopens (overridable at run time with $XP_ORT_LIBRARY).
option(XP_FETCH_ORT_HEADERS "download ONNX Runtime's C API headers (Debian libonnxruntime-dev) when none are found" ON)
set(XP_ORT_INCLUDE_DIR "" CACHE PATH "folder with onnxruntime_c_api.h")
set(XP_ORT_LIBRARY "" CACHE FILEPATH "libonnxruntime.so to load by default")

if(NOT XP_ORT_INCLUDE_DIR)
  find_path(_xp_ort_sys onnxruntime_c_api.h PATH_SUFFIXES onnxruntime onnxruntime/core/session)
  if(_xp_ort_sys)
    set(XP_ORT_INCLUDE_DIR "${_xp_ort_sys}" CACHE PATH "" FORCE)
  elseif(XP_FETCH_ORT_HEADERS)
    set(_xp_ort_dl "${CMAKE_BINARY_DIR}/_deps/onnxruntime")
    if(NOT EXISTS "${_xp_ort_dl}/include/onnxruntime_c_api.h")
      message(STATUS "xp: fetching ONNX Runtime C API headers (Debian libonnxruntime-dev) into ${_xp_ort_dl}")
      execute_process(COMMAND bash "${CMAKE_CURRENT_LIST_DIR}/ort_headers.sh" "${_xp_ort_dl}"
                      RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
      if(NOT _rc EQUAL 0)
        message(FATAL_ERROR "xp: could not fetch the ONNX Runtime headers (${_err}). Install libonnxruntime-dev "
                            "(Debian trixie or later) or pass -DXP_ORT_INCLUDE_DIR=DIR with onnxruntime_c_api.h")
      endif()
    endif()
    set(XP_ORT_INCLUDE_DIR "${_xp_ort_dl}/include" CACHE PATH "" FORCE)
  else()
    message(FATAL_ERROR "xp: onnxruntime_c_api.h not found: pass -DXP_ORT_INCLUDE_DIR=DIR or -DXP_FETCH_ORT_HEADERS=ON")
  endif()
endif()
file(STRINGS "${XP_ORT_INCLUDE_DIR}/onnxruntime_c_api.h" _api REGEX "^#define ORT_API_VERSION [0-9]+")
string(REGEX REPLACE ".* ([0-9]+)$" "\\1" XP_ORT_API_VERSION "${_api}")

if(NOT XP_ORT_LIBRARY)
  find_library(_xp_ort_lib NAMES onnxruntime)
  if(_xp_ort_lib)
    set(XP_ORT_LIBRARY "${_xp_ort_lib}" CACHE FILEPATH "" FORCE)
  else()
    find_package(Python3 COMPONENTS Interpreter QUIET)
    if(Python3_Interpreter_FOUND)
      execute_process(COMMAND "${Python3_EXECUTABLE}" -c
                      "import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime.so.*')))[-1])"
                      RESULT_VARIABLE _rc OUTPUT_VARIABLE _lib OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
      if(_rc EQUAL 0 AND EXISTS "${_lib}")
        set(XP_ORT_LIBRARY "${_lib}" CACHE FILEPATH "" FORCE)
      endif()
    endif()
  endif()
endif()
if(XP_ORT_LIBRARY)
  string(REGEX MATCH "\\.so\\.1\\.([0-9]+)" _m "${XP_ORT_LIBRARY}")
  if(_m AND CMAKE_MATCH_1 LESS XP_ORT_API_VERSION)
    message(FATAL_ERROR "xp: ${XP_ORT_LIBRARY} (ONNX Runtime 1.${CMAKE_MATCH_1}) is older than the headers' "
                        "API ${XP_ORT_API_VERSION}: use a newer library or older headers")
  endif()
  message(STATUS "xp: ONNX Runtime C API ${XP_ORT_API_VERSION} from ${XP_ORT_INCLUDE_DIR}; default library ${XP_ORT_LIBRARY}")
else()
  message(STATUS "xp: ONNX Runtime C API ${XP_ORT_API_VERSION}; no library found, set XP_ORT_LIBRARY at run time")
endif()
