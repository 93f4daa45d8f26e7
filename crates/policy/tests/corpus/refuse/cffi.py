# expect: python.native
from cffi import FFI
ffi = FFI()
lib = ffi.dlopen(None)
