"""Values derived from a weight tensor, computed once and again only when the weight changes.

The int8 conv keeps three kinds (tlcore/ops/int8.py): the C++ kernel's packed weight, the Triton
kernel's padding corrections and the launch plans of eager GPU calls. Each is computed from the
weight's values, so each goes stale when they change: in place (the weight's version counter), through
`w.data = ...` (its storage), or in a way neither shows, which forget_derived_values is told of.
"""
import weakref
from typing import Callable, NamedTuple, TypeVar

import torch
from torch.multiprocessing.reductions import StorageWeakRef

T = TypeVar("T")


class _Derived(NamedTuple):
    """A value derived from a weight tensor, as kept by derived_from_weight."""
    weight: weakref.ref  # the tensor
    key: tuple | None  # what it was derived for (None: stale)
    value: object
    storage: StorageWeakRef  # the storage it was derived from


# The values by (id(weight), what). Entries leave with their weight. (A WeakKeyDictionary would
# compare tensors with ==.)
_derived: dict[tuple[int, str], _Derived] = {}


def derived_from_weight(weight: torch.Tensor, what: str, key: tuple, derive: Callable[[], T]) -> T:
    """derive(), computed once per weight tensor and `what`, and again when `key`, the weight's storage
    (`w.data = ...`) or its version (an in-place change) changes. Inference tensors (made under
    torch.inference_mode) have no version and count as unchanging unless forget_derived_values says
    otherwise (Int8Conv2d's load_state_dict does)."""
    # The storage by identity, not only by address: `w.data = new` keeps w's version, and the new storage
    # may lie where the old one did. The entry's weak reference keeps the old StorageImpl's identity from
    # being reused while the entry holds it.
    storage = weight.untyped_storage()
    key = (storage._cdata, weight.data_ptr(), None if weight.is_inference() else weight._version, *key)
    entry_key = (id(weight), what)
    cached = _derived.get(entry_key)
    new_entry = cached is None or cached.weight() is not weight
    if new_entry or cached.key != key:
        cached = _Derived(weakref.ref(weight), key, derive(), StorageWeakRef(storage))
        _derived[entry_key] = cached
        if new_entry:
            weakref.finalize(weight, _derived.pop, entry_key, None)
    return cached.value


def forget_derived_values(weight: torch.Tensor) -> None:
    """Make every value derived from weight's storage stale, also through other tensor objects over it (a
    traced module's parameters may be such): it changed in a way its version does not show. (The entries
    stay, so their finalizers are not registered again: the next call derives under the same entry.)"""
    storage = weight.untyped_storage()._cdata  # (an entry's weak reference keeps its storage's identity unique)
    # (over a copy: another thread's first call, or a weight's finalizer, may change the dict meanwhile)
    for entry_key, cached in list(_derived.items()):
        if cached.storage.cdata == storage:
            _derived[entry_key] = cached._replace(key=None)
