# dsa as a package for other projects (README, "Using the library"): the CMake package
# (find_package(dsa) -> dsa::dsa) in LIBDIR/cmake/dsa and the pkg-config file dsa.pc in
# LIBDIR/pkgconfig. lib/CMakeLists.txt installs the library and the headers.
include(CMakePackageConfigHelpers)
add_library(dsa::dsa ALIAS dsa)

# The library of a sanitizer build needs its runtimes wherever it is linked.
set(DSA_PACKAGE_SANITIZE OFF)
set(DSA_PC_LIBS ${OpenMP_CXX_FLAGS})
if(DSA_SANITIZE OR DSA_FUZZ)
  set(DSA_PACKAGE_SANITIZE ON)
  target_link_options(dsa INTERFACE $<INSTALL_INTERFACE:-fsanitize=address,undefined>)
  list(APPEND DSA_PC_LIBS -fsanitize=address,undefined)
endif()
set(DSA_CUDA_VERSION "")
if(DSA_HAVE_CUDA)
  set(DSA_CUDA_VERSION ${CUDAToolkit_VERSION_MAJOR}.${CUDAToolkit_VERSION_MINOR})
  # What CUDA::cudart_static links (FindCUDAToolkit: cudart_static, dl, rt, Threads).
  get_filename_component(cudart_dir "${CUDA_cudart_static_LIBRARY}" DIRECTORY)
  list(APPEND DSA_PC_LIBS -L${cudart_dir} -lcudart_static -ldl -lrt -lpthread)
endif()
list(JOIN DSA_PC_LIBS " " DSA_PC_LIBS)

set(dsa_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/dsa)
install(EXPORT dsaTargets NAMESPACE dsa:: FILE dsaTargets.cmake DESTINATION ${dsa_cmake_dir})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/dsaConfig.cmake.in
  ${PROJECT_BINARY_DIR}/cmake/dsaConfig.cmake INSTALL_DESTINATION ${dsa_cmake_dir})
# 0.x: a minor release may change the API, so 0.1.z satisfies find_package(dsa 0.1[.y]) only;
# from 1.0 on, any later release of the same major version does.
if(PROJECT_VERSION_MAJOR EQUAL 0)
  set(dsa_compatibility SameMinorVersion)
else()
  set(dsa_compatibility SameMajorVersion)
endif()
write_basic_package_version_file(${PROJECT_BINARY_DIR}/cmake/dsaConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY ${dsa_compatibility})
install(FILES ${PROJECT_BINARY_DIR}/cmake/dsaConfig.cmake
              ${PROJECT_BINARY_DIR}/cmake/dsaConfigVersion.cmake
        DESTINATION ${dsa_cmake_dir})

# dsa.pc holds absolute paths, so it is configured twice: here everything but the prefix, and
# at install time with the prefix being installed to (cmake --install --prefix, DESTDIR kept out).
set(DSA_PC_PREFIX "@DSA_INSTALL_PREFIX@")
foreach(dir LIBDIR INCLUDEDIR)
  if(IS_ABSOLUTE "${CMAKE_INSTALL_${dir}}")
    set(DSA_PC_${dir} "${CMAKE_INSTALL_${dir}}")
  else()
    set(DSA_PC_${dir} "\${prefix}/${CMAKE_INSTALL_${dir}}")
  endif()
endforeach()
configure_file(${PROJECT_SOURCE_DIR}/cmake/dsa.pc.in ${PROJECT_BINARY_DIR}/cmake/dsa.pc.in @ONLY)
install(CODE "
  set(DSA_INSTALL_PREFIX \"\${CMAKE_INSTALL_PREFIX}\")
  configure_file(\"${PROJECT_BINARY_DIR}/cmake/dsa.pc.in\" \"${PROJECT_BINARY_DIR}/cmake/dsa.pc\" @ONLY)")
install(FILES ${PROJECT_BINARY_DIR}/cmake/dsa.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
