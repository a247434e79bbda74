"""Kernel tests run the Triton kernels under the Triton interpreter when no GPU is present.

Triton decides between compiling and interpreting when a kernel is decorated, i.e. when
`seer_adapter.kernels.block_sparse_triton` is imported, so ``TRITON_INTERPRET=1`` is set here, before the test modules
import the package. If something imported the kernels earlier (compiled), they are re-imported under the interpreter.
"""

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _compiled = sys.modules.get("seer_adapter.kernels.block_sparse_triton")
    if _compiled is not None and not _compiled._KERNELS_INTERPRETED:
        importlib.reload(_compiled)
        for name in (
            "seer_adapter.kernels.ground_truth",
            "seer_adapter.kernels.decode_ground_truth_triton",
            "seer_adapter.kernels.block_select_triton",
            "seer_adapter.kernels.sparse_decode_triton",
            "seer_adapter.kernels.decode_scores_triton",
        ):
            if name in sys.modules:
                importlib.reload(sys.modules[name])
