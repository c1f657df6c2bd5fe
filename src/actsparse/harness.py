"""``python -m actsparse.harness ARGS`` (or ``actsparse-lm-eval ARGS``): lm-evaluation-harness's
own command line, with actsparse imported first, so that ``--model hf --model_args
pretrained=DIR`` loads an actsparse checkpoint as the sparse model it is (plain ``lm_eval``
does not import actsparse, and transformers would load the dense weights).

Data-parallel over several GPUs, with lm-eval's own launcher::

    accelerate launch -m actsparse.harness --model hf --model_args pretrained=DIR --tasks arc_easy --batch_size 16
"""

from __future__ import annotations

import sys

import actsparse  # noqa: F401  (registers the "actsparse" quantization method with transformers)
from actsparse.errors import ActsparseError
from actsparse.eval.lmeval import require_lm_eval


def main() -> None:
    try:
        require_lm_eval()
    except ActsparseError as error:
        print(f"actsparse: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
