"""Parameter trees by name: "layers/attention/query/kernel" -> leaf, and back."""

from __future__ import annotations

from typing import Any

import jax


def key_name(key: Any) -> str:
    """The name of one step of a pytree path (dict key, sequence index or attribute)."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_names(path: tuple) -> tuple[str, ...]:
    """A pytree path as a tuple of names."""
    return tuple(key_name(k) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
    """{"layers/attention/query/kernel": leaf, ...} for a nested parameter tree (arrays, abstract values, metadata)."""
    return {"/".join(path_names(path)): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """The nested dict of a `flatten`ed one."""
    tree: dict[str, Any] = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"path/to/param": shape} of a parameter tree."""
    return {name: tuple(leaf.shape) for name, leaf in flatten(tree).items()}
