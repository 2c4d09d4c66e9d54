#!/usr/bin/env bash
# Build the native CPU engine exactly as kernels/native.py does and run check_kernels.cpp against it.
#
#   tests/kernels/native_harness/run.sh [native|aarch64]
#
# native   this machine's compiler ($CXX, else c++ / g++ / clang++) and architecture
# aarch64  the AArch64 cross compiler ($AARCH64_CXX, default aarch64-linux-gnu-g++), run under
#          qemu-aarch64 (or qemu-aarch64-static; $QEMU overrides) with -L $QEMU_LD_PREFIX
#          (default /usr/aarch64-linux-gnu).  Debian: apt-get install g++-aarch64-linux-gnu qemu-user-static
#
# The compiler flags and the instruction sets per architecture are read from kernels/native.py
# (COMMON_FLAGS, _ISA_FLAGS; stdlib Python only, torch is not imported), so this script builds
# what the library builds: one isa_kernels.cpp object per instruction set the compiler accepts,
# dispatch.cpp with -DBQ_HAVE_<NAME> for each, linked into libbitqat.so; the harness links that
# library.  BUILD_DIR keeps the build (default: a temporary directory, removed afterwards).
set -euo pipefail

target="${1:-native}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
src="$repo/kernels/native_src"
python="${PYTHON:-python3}"

case "$target" in
  native)
    if [[ -n "${CXX:-}" ]]; then cxx="$CXX"
    else cxx="$(command -v c++ || command -v g++ || command -v clang++ || true)"; fi
    [[ -n "$cxx" ]] || { echo "run.sh: no C++ compiler (set CXX)" >&2; exit 2; }
    case "$(uname -m)" in
      x86_64|amd64) arch=x86 ;;
      aarch64|arm64) arch=arm64 ;;
      *) arch=other ;;
    esac
    runner=()
    ;;
  aarch64)
    cxx="${AARCH64_CXX:-aarch64-linux-gnu-g++}"
    command -v "$cxx" >/dev/null || { echo "run.sh: $cxx not found (apt-get install g++-aarch64-linux-gnu)" >&2; exit 2; }
    qemu="${QEMU:-$(command -v qemu-aarch64 || command -v qemu-aarch64-static || true)}"
    [[ -n "$qemu" ]] || { echo "run.sh: qemu-aarch64 not found (apt-get install qemu-user-static)" >&2; exit 2; }
    arch=arm64
    runner=("$qemu" -L "${QEMU_LD_PREFIX:-/usr/aarch64-linux-gnu}")
    ;;
  *)
    echo "usage: $0 [native|aarch64]" >&2
    exit 2
    ;;
esac

# "<common flags>" then one "<isa> <flags...>" line per instruction set, from kernels/native.py.
flag_lines="$("$python" - "$repo/kernels/native.py" "$arch" <<'EOF'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
values = {}
for node in tree.body:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        if node.targets[0].id in ("COMMON_FLAGS", "_ISA_FLAGS"):
            values[node.targets[0].id] = ast.literal_eval(node.value)
print(" ".join(values["COMMON_FLAGS"]))
for isa, flags in values["_ISA_FLAGS"][sys.argv[2]].items():
    print(isa, *flags)
EOF
)"
read -r -a common <<<"$(head -n1 <<<"$flag_lines")"

if [[ -n "${BUILD_DIR:-}" ]]; then
  build="$BUILD_DIR"
  mkdir -p "$build"
else
  build="$(mktemp -d "${TMPDIR:-/tmp}/bitqat-harness-$target.XXXXXX")"
  trap 'rm -rf "$build"' EXIT
fi

start=$(date +%s.%N)
# One object per instruction set, in parallel; those the compiler rejects are left out (as native.py).
declare -A pids
while read -r isa flags; do
  upper="$(tr '[:lower:]' '[:upper:]' <<<"$isa")"
  # shellcheck disable=SC2086
  "$cxx" "${common[@]}" $flags "-DBQ_ISA_$upper" "-DBQ_ISA_NAME=$isa" -c "$src/isa_kernels.cpp" \
    -o "$build/isa_$isa.o" >"$build/isa_$isa.log" 2>&1 &
  pids[$isa]=$!
done < <(tail -n +2 <<<"$flag_lines")
built=() objects=() defines=()
while read -r isa _; do
  if wait "${pids[$isa]}"; then
    built+=("$isa")
    objects+=("$build/isa_$isa.o")
    defines+=("-DBQ_HAVE_$(tr '[:lower:]' '[:upper:]' <<<"$isa")")
  else
    echo "run.sh: $isa not built: $(tail -n1 "$build/isa_$isa.log")"
  fi
done < <(tail -n +2 <<<"$flag_lines")
[[ " ${built[*]} " == *" scalar "* ]] || { echo "run.sh: the scalar kernels did not compile" >&2; cat "$build/isa_scalar.log" >&2; exit 2; }
"$cxx" "${common[@]}" "${defines[@]}" -c "$src/dispatch.cpp" -o "$build/dispatch.o"
"$cxx" -shared -o "$build/libbitqat.so" "$build/dispatch.o" "${objects[@]}" -lpthread
"$cxx" "${common[@]}" -I"$src" -c "$here/check_kernels.cpp" -o "$build/check_kernels.o"
"$cxx" -o "$build/check_kernels" "$build/check_kernels.o" -L"$build" -lbitqat -Wl,-rpath,"$build" -lpthread
built_at=$(date +%s.%N)

echo "run.sh: $target ($arch, $("$cxx" --version | head -n1)): built ${built[*]}"
status=0
"${runner[@]}" "$build/check_kernels" || status=$?
end=$(date +%s.%N)
awk -v a="$start" -v b="$built_at" -v c="$end" 'BEGIN { printf "run.sh: build %.1f s, run %.1f s\n", b - a, c - b }'
exit $status
