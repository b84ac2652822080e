# Source this before running duet on a GPU machine: puts libcuda and libnvrtc (with its
# builtins) on LD_LIBRARY_PATH, from the CUDA toolkit or from the nvidia-* pip wheels, whichever
# the machine has. duet opens them at run time; nothing is linked at build time.
_duet_libdirs=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu \
         /usr/local/nvidia/lib64 $(python3 -c 'import nvidia, os; [print(os.path.join(p, "cu13", "lib")) for p in nvidia.__path__]' 2>/dev/null); do
    if ls "$d"/libnvrtc.so* >/dev/null 2>&1 || ls "$d"/libcuda.so* >/dev/null 2>&1; then
        _duet_libdirs="$_duet_libdirs:$d"
    fi
done
export LD_LIBRARY_PATH="${_duet_libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Shared multi-GPU hosts forbid NVLink multicast; keep it off for anything we start.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset _duet_libdirs
