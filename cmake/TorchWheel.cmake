# LibTorch straight from the torch wheel at TORCH_ROOT, for machines without nvcc (torch's own
# CMake package insists on the CUDA toolkit for the CUDA build of the wheel). Defines
# TORCH_LIBRARIES as an interface target with the wheel's headers, libraries and ABI.
file(GLOB NVIDIA_INCLUDE_DIRS "${TORCH_ROOT}/../nvidia/*/include")
file(GLOB NVIDIA_LIB_DIRS "${TORCH_ROOT}/../nvidia/*/lib")
add_library(torch_wheel INTERFACE)
target_include_directories(torch_wheel SYSTEM INTERFACE ${TORCH_ROOT}/include
                           ${TORCH_ROOT}/include/torch/csrc/api/include ${NVIDIA_INCLUDE_DIRS})
set(torch_libs torch torch_cpu c10)
if(EXISTS ${TORCH_ROOT}/lib/libtorch_cuda.so)
  list(APPEND torch_libs torch_cuda c10_cuda)
endif()
foreach(lib ${torch_libs})
  target_link_libraries(torch_wheel INTERFACE ${TORCH_ROOT}/lib/lib${lib}.so)
endforeach()
# The CUDA libraries torch_cuda needs are found at run time through the wheel's RPATH; at link
# time the linker is told where they are.
foreach(dir ${NVIDIA_LIB_DIRS})
  target_link_options(torch_wheel INTERFACE "LINKER:-rpath-link,${dir}")
endforeach()
target_link_options(torch_wheel INTERFACE "LINKER:-rpath,${TORCH_ROOT}/lib" "LINKER:--no-as-needed")
target_compile_definitions(torch_wheel INTERFACE _GLIBCXX_USE_CXX11_ABI=1)
set(TORCH_LIBRARIES torch_wheel)
message(STATUS "torch from the wheel at ${TORCH_ROOT} (no nvcc: CUDA kernels are not built)")
