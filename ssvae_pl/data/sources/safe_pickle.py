"""Unpicklers that can only rebuild numpy arrays: MNIST's ``mnist.pkl.gz`` and CIFAR-10's batch files are pickles,
and a pickle from anywhere else must not run code."""

from __future__ import annotations

import importlib
import pickle

import numpy as np

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(text, "latin1"); served by _latin1_encode
    ("_codecs", "encode"),
}


class NumpyArraysUnpickler(pickle.Unpickler):
    """Any global but numpy's array rebuilding raises ``UnpicklingError``; numpy's protocol-5 form of arrays
    (``_frombuffer``, which Python 3's default ``pickle.dump`` writes) is rebuilt too."""

    def find_class(self, module: str, name: str) -> object:
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
            return _frombuffer
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"forbidden global in pickle: {module}.{name} (only numpy arrays allowed)")
        if name == "ndarray":
            return np.ndarray
        if name == "dtype":
            return np.dtype
        if name == "encode":
            return _latin1_encode
        return _numpy_multiarray()._reconstruct


def _numpy_multiarray():  # numpy >= 2 moved numpy.core to numpy._core
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"forbidden call in pickle: _codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


def _frombuffer(buffer, dtype, shape, order) -> np.ndarray:
    """What numpy's ``_frombuffer`` does: an array of ``dtype`` and ``shape`` over ``buffer``'s bytes."""
    if not isinstance(dtype, np.dtype) or not isinstance(shape, tuple) or order not in ("C", "F"):
        raise pickle.UnpicklingError("forbidden call in pickle: _frombuffer with unexpected arguments")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)
