# Small helpers so every folder declares its library and tests the same way.

# pkv_library(NAME folder SOURCES ... DEPS ...): static library pkv_<name>, alias pkv::<name>.
function(pkv_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS" ${ARGN})
  add_library(pkv_${name} STATIC ${ARG_SOURCES})
  add_library(pkv::${name} ALIAS pkv_${name})
  target_include_directories(pkv_${name} PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(pkv_${name} PUBLIC ${ARG_DEPS})
  target_compile_options(pkv_${name} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra>)
endfunction()

# pkv_test(NAME SOURCES ... DEPS ... [LABELS ...]): a GoogleTest binary registered with CTest.
function(pkv_test name)
  cmake_parse_arguments(ARG "" "TIMEOUT" "SOURCES;DEPS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS} GTest::gtest GTest::gtest_main)
  add_test(NAME ${name} COMMAND ${name})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 600)
  endif()
  set_tests_properties(${name} PROPERTIES TIMEOUT ${ARG_TIMEOUT})
  if(ARG_LABELS)
    set_tests_properties(${name} PROPERTIES LABELS "${ARG_LABELS}")
  endif()
endfunction()
