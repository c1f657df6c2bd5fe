#!/usr/bin/env bash
# Build the actsparse wheel (python -m build), install it in a fresh virtual environment
# (torch first, then the wheel and its dependencies from the package index), and smoke-test
# the installed command outside the clone: --help, patterns, and an eval and an export round
# trip of a tiny random-weight model.
#
#   TORCH_SPEC   torch requirement installed before the wheel (default: torch==2.13.0, the CPU build)
#   PYTHON       interpreter that creates the fresh environment (default: python3)
#   BUILD_PY     interpreter with `build` installed (default: .venv/bin/python)
#   CONSTRAINTS  pip constraints file for the wheel's dependencies (default: constraints.txt; empty: none)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"${BUILD_PY:-.venv/bin/python}" -m build --wheel --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/actsparse-*.whl)
echo "built $(basename "$WHEEL")"
"${PYTHON:-python3}" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
constraints=()
c=${CONSTRAINTS-constraints.txt}
if [ -n "$c" ]; then case $c in /*) ;; *) c="$PWD/$c" ;; esac; constraints=("-c" "$c"); fi
"${PIP[@]}" "${constraints[@]}" "$WHEEL"
cd "$WORK"  # away from the clone: only the installed package can be imported
export ACTSPARSE_CACHE="$WORK/cache" HF_HUB_OFFLINE=1
venv/bin/actsparse --help >/dev/null
venv/bin/actsparse patterns 2:4 8:16
venv/bin/python - <<'PY'
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

text = "the cat sat on the mat . the dog ran to the park and the cat ran after it . " * 20
words = sorted(set(text.split()))
core = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}, unk_token="<unk>"))
core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tf.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>").save_pretrained("tiny")
config = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
tf.LlamaForCausalLM(config).save_pretrained("tiny")
open("tiny/text.txt", "w").write(text)
PY
COMMON=(--model tiny --data tiny/text.txt --seqlen 16 --pattern 2:4 --criterion amber --mitigation var --device cpu --no-progress)
venv/bin/actsparse eval "${COMMON[@]}"
venv/bin/actsparse export "${COMMON[@]}" --out tiny-2-4
venv/bin/python - <<'PY'
import torch
import actsparse
from transformers import AutoModelForCausalLM

loaded = AutoModelForCausalLM.from_pretrained("tiny-2-4")
model = AutoModelForCausalLM.from_pretrained("tiny")
actsparse.sparsify_(model, actsparse.SparsityConfig(pattern="2:4", criterion="amber", mitigation="var"))
ids = torch.arange(2, 18).unsqueeze(0)
with torch.no_grad():
    assert torch.equal(loaded(ids).logits, model(ids).logits), "exported checkpoint differs"
print(f"wheel smoke test passed: {len(actsparse.sparsify.sparse_layers(loaded))} sparse layers reloaded from the export")
PY
