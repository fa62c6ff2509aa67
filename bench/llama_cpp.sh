#!/usr/bin/env bash
# Build llama.cpp from source (the copy vendored in llama-cpp-python's sdist) and convert a HF
# checkpoint to GGUF in bf16 and Q4_0, for bench/quantized.py's side-by-side comparison.
#
#   bench/llama_cpp.sh build BUILD_DIR                 # once; ~15 min on 2 cores
#   bench/llama_cpp.sh convert BUILD_DIR MODEL_DIR     # MODEL_DIR/model-bf16.gguf, MODEL_DIR/model-q4_0.gguf
#
# BUILD_DIR lives outside this repository (no llama.cpp code is ever committed here). PYTHON (default:
# python3) runs the converter (with llama.cpp's own gguf-py on its path); it needs torch, numpy, safetensors
# and transformers, as moela's tests do. MODEL_DIR needs a tokenizer.json (bench/quantized.py copies one in).
set -euo pipefail

VERSION=0.3.36  # llama-cpp-python release whose sdist vendors llama.cpp
PYTHON=${PYTHON:-python3}
cmd=${1:?usage: $0 build BUILD_DIR | convert BUILD_DIR MODEL_DIR}
build=${2:?BUILD_DIR missing}
src="$build/llama_cpp_python-$VERSION/vendor/llama.cpp"

if [ "$cmd" = build ]; then
    mkdir -p "$build"
    cd "$build"
    [ -f "llama_cpp_python-$VERSION.tar.gz" ] ||
        "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
    [ -d "$src" ] || tar xzf "llama_cpp_python-$VERSION.tar.gz"
    cd "$src"
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
    cmake --build build -j"$(nproc)" --target llama-bench llama-batched-bench llama-quantize
    ls -l build/bin/llama-bench build/bin/llama-batched-bench build/bin/llama-quantize
elif [ "$cmd" = convert ]; then
    model=${3:?MODEL_DIR missing}
    # The converter picks a pre-tokenizer by hashing the tokenizer's output; a random-weight checkpoint's
    # tokenizer is in none of its tables, so a patched copy of the converter falls back to gpt-2's.
    "$PYTHON" - "$src" <<'EOF'
import pathlib, re, sys
src = pathlib.Path(sys.argv[1])
for f in [src / "convert_hf_to_gguf.py", *sorted((src / "conversion").glob("*.py"))]:
    if not f.exists():
        continue
    text = f.read_text()
    new = re.sub(r"(\n(\s+)def get_vocab_base_pre\(self, tokenizer\)[^\n]*:\n)", r'\1\2    return "gpt-2"\n', text, count=1)
    if new != text and 'return "gpt-2"\n' not in text.split("def get_vocab_base_pre", 1)[1][:200]:
        f.write_text(new)
        print(f"patched {f}")
EOF
    PYTHONPATH="$src/gguf-py${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$src/convert_hf_to_gguf.py" "$model" --outtype bf16 --outfile "$model/model-bf16.gguf"
    "$src/build/bin/llama-quantize" "$model/model-bf16.gguf" "$model/model-q4_0.gguf" Q4_0
else
    echo "unknown command $cmd (build | convert)" >&2
    exit 2
fi
