#!/usr/bin/env python3
"""Compiles CUDA sources with NVRTC exactly as gym-serve does at run time
(no include paths, NVRTC's default architecture), so a kernel that would
fail to compile on a GPU machine fails here, on a machine without a GPU.

    nvrtc-check.py LIBNVRTC FILE.cu...

Standard library only (ctypes)."""
import ctypes
import sys


def compile_one(nvrtc, path):
    with open(path, "rb") as f:
        src = f.read()
    prog = ctypes.c_void_p()
    check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, path.encode(), 0, None, None))
    result = nvrtc.nvrtcCompileProgram(prog, 0, None)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    ptx_size = ctypes.c_size_t()
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(ptx_size))
    text = log.value.decode(errors="replace").strip()
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    if result != 0:
        print(f"{path}: NVRTC failed (error {result}):\n{text}", file=sys.stderr)
        return False
    print(f"{path}: NVRTC ok, {ptx_size.value} bytes of PTX" + (f"\n{text}" if text else ""))
    return True


def check(nvrtc, code):
    if code != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise SystemExit(f"NVRTC: {nvrtc.nvrtcGetErrorString(code).decode()}")


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    nvrtc = ctypes.CDLL(sys.argv[1])
    ok = all([compile_one(nvrtc, p) for p in sys.argv[2:]])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
