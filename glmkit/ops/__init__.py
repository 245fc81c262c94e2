"""Kernel-backed ops, one module per op, 1:1 with the Triton kernels in ``kernels/`` (``glmkit.kernels``).

Each ``glmkit/ops/<op>.py`` holds the op's plain-torch reference (``<op>_reference``, the readable
definition every faster path is tested against), its autograd wiring around the kernel launchers of
``kernels/<op>.py``, and the public function ``<op>(...)`` that validates its arguments (shapes, dtypes,
devices: never values, which would cost a host sync) and dispatches through ``glmkit.backend``: the Triton
kernel where the backend resolves to "triton" (CUDA tensors by default), the reference otherwise.
``tests/ops/test_<op>.py`` checks the kernels against the reference, forward and backward.
"""
