"""A persistent B-tree: a sorted mapping that stays fast with millions of items.

A :class:`BTree` is a mutable mapping whose keys are kept in order. Its items
live in persistent nodes (:class:`BNode` and its sized subclasses), so a change
stores only the few nodes on the path to the changed item, and a lookup loads
only the nodes on its path::

    tree = BTree()
    tree[3] = "c"
    tree[1] = "a"
    list(tree.items_from(2))   # [(3, "c")]

The node classes differ only in their minimum degree *t*: every node except the
root holds between ``t - 1`` and ``2 t - 1`` items. :class:`BNode64` is the
default (Durus's is :class:`BNode16`): fewer, larger nodes make building and
scanning a tree about twice as fast, for a larger record to write when one
item changes. Pass ``node_constructor`` to :class:`BTree` (or call
:meth:`BTree.set_bnode_class` later) to choose another.

Stored layout, identical to Durus: a tree's state is ``{"root": node}``; a
node's state holds ``items`` (a sorted list of ``(key, value)`` tuples),
``nodes`` (the list of child nodes, or None for a leaf) and ``_count`` (the
number of items in the node and all nodes below it), which makes ``len(tree)``
cost nothing.

Limitations:

- Durus 4.3 and earlier did not store ``_count``. Nodes read from such files
  compute it when first needed (loading the nodes below them once) without
  being marked changed; a node gets a stored count the next time it is
  written. A Durus 4.3 process that writes to the same database at the same
  time as dhruva would leave stale counts; do not mix the two as writers.
- Because every insertion or deletion updates the counts of the nodes on its
  path, two transactions that change different keys of one tree conflict on
  the root node; retry the transaction after ``connection.abort()``.
- Keys must be totally ordered among themselves (do not mix ``str`` and
  ``int`` keys); a key that cannot be compared raises :class:`TypeError`.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections.abc import (
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    MutableMapping,
    ValuesView,
)
from operator import itemgetter
from typing import Any

from dhruva.error import DhruvaError
from dhruva.persistent import (
    GHOST_CLASS_MARK,
    PersistentObject,
    _btree_add,
    _getattribute,
    _setattribute,
)

log = logging.getLogger(__name__)

__all__ = [
    "BNode",
    "BNode4",
    "BNode8",
    "BNode16",
    "BNode32",
    "BNode64",
    "BNode128",
    "BNode256",
    "BNode512",
    "BTree",
    "BTreeItemsView",
    "BTreeKeysView",
    "BTreeValuesView",
    "EmptyBTreeError",
]

Item = tuple[Any, Any]

_first = itemgetter(0)
_second = itemgetter(1)

# Hot paths read a node's first attribute normally, which loads a ghost and
# records the access, and then read its other attributes directly: a node stays
# loaded until the connection shrinks its cache at commit or abort.
# TODO(#6): descend, insert and delete in C; the attribute hooks dominate here.
_note_change = PersistentObject._p_note_change


class EmptyBTreeError(DhruvaError, AssertionError):
    """The smallest or largest item of an empty :class:`BTree` was asked for.

    It is an :class:`AssertionError` because Durus raises one here, so code
    written for Durus keeps catching it.
    """


class BNode(PersistentObject):
    """One node of a :class:`BTree`, with minimum degree 2.

    Applications use the subclasses with a larger degree through
    :class:`BTree`; the methods here are the read-only helpers Durus offered.
    """

    __slots__ = ("items", "nodes", "_count")

    #: The minimum degree *t*: non-root nodes hold ``t - 1`` to ``2 t - 1`` items.
    minimum_degree = 2

    #: Sorted ``(key, value)`` tuples held by this node.
    items: list[Item]
    #: Child nodes (one more than ``items``), or None for a leaf.
    nodes: list[BNode] | None
    #: Items in this node and below; absent in nodes written by Durus 4.3.
    _count: int

    def __setstate__(self, state: Any) -> None:
        # Some Durus versions after 4.3 store the count as ``_len``.
        if state and "_len" in state:
            state = dict(state)
            state.setdefault("_count", state.pop("_len"))
        super().__setstate__(state)

    def __init__(self) -> None:
        self.items = []
        self.nodes = None
        self._count = 0

    def is_leaf(self) -> bool:
        """Return True when this node has no children."""
        return self.nodes is None

    def is_full(self) -> bool:
        """Return True when this node cannot take another item."""
        return len(self.items) >= 2 * type(self).minimum_degree - 1

    def get_position(self, key: Any) -> int:
        """Return the index of the first item whose key is not below ``key``."""
        return bisect_left(self.items, key, key=_first)

    def search(self, key: Any) -> Item | None:
        """Return the ``(key, value)`` item for ``key`` in this subtree, or None."""
        return _search(self, key)

    def get_min_item(self) -> Item:
        """Return the item with the smallest key in this subtree."""
        node = self
        while node.nodes is not None:
            node = node.nodes[0]
        return node.items[0]

    def get_max_item(self) -> Item:
        """Return the item with the largest key in this subtree."""
        node = self
        while node.nodes is not None:
            node = node.nodes[-1]
        return node.items[-1]

    def get_count(self) -> int:
        """Return the number of items in this node and its descendants."""
        return _count_of(self)

    def get_node_count(self) -> int:
        """Return the number of nodes in this subtree, this one included."""
        total = 0
        pending: list[BNode] = [self]
        while pending:
            node = pending.pop()
            total += 1
            if node.nodes is not None:
                pending.extend(node.nodes)
        return total

    def get_level(self) -> int:
        """Return how many levels of nodes lie below this one (0 for a leaf)."""
        level = 0
        node = self
        while node.nodes is not None:
            node = node.nodes[0]
            level += 1
        return level

    def __iter__(self) -> Iterator[Item]:
        return _forward(*_leftmost_path(self))

    def __reversed__(self) -> Iterator[Item]:
        return _backward(*_rightmost_path(self))

    def iter_from(self, key: Any) -> Iterator[Item]:
        """Yield, in order, the items of this subtree whose keys are >= ``key``."""
        return _forward(*_path_to(self, key, bisect_left))

    def iter_backward_from(self, key: Any) -> Iterator[Item]:
        """Yield, in reverse order, the items whose keys are < ``key``."""
        return _backward(*_path_to(self, key, bisect_left))


class BNode4(BNode):
    """A :class:`BNode` of minimum degree 4."""

    __slots__ = ()
    minimum_degree = 4


class BNode8(BNode):
    """A :class:`BNode` of minimum degree 8."""

    __slots__ = ()
    minimum_degree = 8


class BNode16(BNode):
    """A :class:`BNode` of minimum degree 16, the default."""

    __slots__ = ()
    minimum_degree = 16


class BNode32(BNode):
    """A :class:`BNode` of minimum degree 32."""

    __slots__ = ()
    minimum_degree = 32


class BNode64(BNode):
    """A :class:`BNode` of minimum degree 64."""

    __slots__ = ()
    minimum_degree = 64


class BNode128(BNode):
    """A :class:`BNode` of minimum degree 128."""

    __slots__ = ()
    minimum_degree = 128


class BNode256(BNode):
    """A :class:`BNode` of minimum degree 256."""

    __slots__ = ()
    minimum_degree = 256


class BNode512(BNode):
    """A :class:`BNode` of minimum degree 512."""

    __slots__ = ()
    minimum_degree = 512


# ---- counts ---------------------------------------------------------------


def _count_of(node: BNode) -> int:
    """Return the number of items below ``node``, computing it when not stored.

    A computed count is kept on the node without marking it changed: it equals
    what is stored below, so the node still matches its stored state.
    """
    try:
        return node._count
    except AttributeError:
        pass
    total = len(node.items)
    nodes = node.nodes
    if nodes is not None:
        for child in nodes:
            total += _count_of(child)
    _setattribute(node, "_count", total)
    return total


def _known_count(node: BNode) -> int | None:
    """Return the count held by ``node``, or None when it has none."""
    try:
        return node._count
    except AttributeError:
        return None


def _bump(node: BNode, delta: int) -> None:
    """Add ``delta`` to the count of ``node``, which is marked changed either way.

    Every node on the path of an insertion or deletion is written, so that
    other connections drop any count they computed for it. ``node`` must have
    been read already in this operation (so it is not a ghost).
    """
    _note_change(node)
    try:
        count = _getattribute(node, "_count")
    except AttributeError:
        return
    _setattribute(node, "_count", count + delta)


def _recount(node: BNode) -> None:
    """Set the count of ``node`` from its items and its children's counts.

    When a child has no count, ``node`` is left without one too (to be computed
    when needed) rather than loading the child's whole subtree now.
    """
    total = len(node.items)
    nodes = node.nodes
    if nodes is not None:
        for child in nodes:
            count = _known_count(child)
            if count is None:
                if _known_count(node) is not None:
                    del node._count
                return
            total += count
    node._count = total


# ---- lookup and iteration -----------------------------------------------


def _search(node: BNode, key: Any) -> Item | None:
    """Return the item for ``key`` below ``node``, or None."""
    while True:
        items = node.items
        position = bisect_left(items, key, key=_first)
        if position < len(items) and items[position][0] == key:
            return items[position]
        nodes = node.nodes
        if nodes is None:
            return None
        node = nodes[position]


Path = list[tuple[BNode, int]]


def _leftmost_path(node: BNode) -> tuple[Path, BNode, int]:
    path: Path = []
    nodes = node.nodes
    while nodes is not None:
        path.append((node, 0))
        node = nodes[0]
        nodes = node.nodes
    return path, node, 0


def _rightmost_path(node: BNode) -> tuple[Path, BNode, int]:
    path: Path = []
    nodes = node.nodes
    while nodes is not None:
        path.append((node, len(nodes) - 1))
        node = nodes[-1]
        nodes = node.nodes
    return path, node, len(node.items)


def _path_to(node: BNode, key: Any, bisect: Any) -> tuple[Path, BNode, int]:
    """Descend towards ``key``, recording in each node the child taken.

    ``bisect`` is :func:`bisect.bisect_left` to stop before an equal key or
    :func:`bisect.bisect_right` to stop after it.
    """
    path: Path = []
    while True:
        position = bisect(node.items, key, key=_first)
        nodes = node.nodes
        if nodes is None:
            return path, node, position
        path.append((node, position))
        node = nodes[position]


def _forward(path: Path, leaf: BNode, start: int) -> Iterator[Item]:
    """Yield items in order from ``leaf.items[start]`` to the end of the tree.

    ``path`` holds ``(node, i)`` for each node above ``leaf``: child ``i`` is
    the one being walked. It is consumed.
    """
    items = leaf.items
    yield from items[start:] if start else items
    while path:
        parent, position = path.pop()
        items = parent.items
        if position < len(items):
            yield items[position]
            position += 1
            path.append((parent, position))
            node = parent.nodes[position]  # type: ignore[index]
            nodes = node.nodes
            while nodes is not None:
                path.append((node, 0))
                node = nodes[0]
                nodes = node.nodes
            yield from node.items


def _backward(path: Path, leaf: BNode, end: int) -> Iterator[Item]:
    """Yield items in reverse order from ``leaf.items[end - 1]`` to the start."""
    items = leaf.items
    yield from reversed(items[:end])
    while path:
        parent, position = path.pop()
        if position > 0:
            position -= 1
            yield parent.items[position]
            path.append((parent, position))
            node = parent.nodes[position]  # type: ignore[index]
            nodes = node.nodes
            while nodes is not None:
                path.append((node, len(nodes) - 1))
                node = nodes[-1]
                nodes = node.nodes
            yield from reversed(node.items)


# ---- restructuring ------------------------------------------------------


def _split_child(parent: BNode, position: int, child: BNode) -> None:
    """Split the full ``child`` (``parent.nodes[position]``) around its middle."""
    degree = type(child).minimum_degree
    items = child.items
    nodes = child.nodes
    sibling = child.__class__()
    sibling.items = items[degree:]
    child.items = items[: degree - 1]
    if nodes is not None:
        sibling.nodes = nodes[degree:]
        child.nodes = nodes[:degree]
    parent.items.insert(position, items[degree - 1])
    parent.nodes.insert(position + 1, sibling)  # type: ignore[union-attr]
    parent._p_note_change()
    _recount(child)
    _recount(sibling)


def _merge_children(parent: BNode, position: int) -> BNode:
    """Merge child ``position + 1`` and the item between into child ``position``."""
    items = parent.items
    nodes = parent.nodes
    assert nodes is not None
    left = nodes[position]
    right = nodes[position + 1]
    left.items.append(items[position])
    left.items.extend(right.items)
    left_nodes = left.nodes
    if left_nodes is not None:
        left_nodes.extend(right.nodes)  # type: ignore[arg-type]
    del items[position]
    del nodes[position + 1]
    parent._p_note_change()
    left._p_note_change()
    _recount(left)
    return left


def _fill_child(parent: BNode, position: int) -> BNode:
    """Top up the small child ``position`` of ``parent`` to at least ``t`` items.

    :returns: the node that now holds the child's keys (a merge may move them
        into the left sibling).
    """
    items = parent.items
    nodes = parent.nodes
    assert nodes is not None
    child = nodes[position]
    degree = type(child).minimum_degree

    # Borrow one item from a sibling that can spare it.
    if position > 0 and len(nodes[position - 1].items) >= degree:
        left = nodes[position - 1]
        child.items.insert(0, items[position - 1])
        items[position - 1] = left.items.pop()
        if child.nodes is not None:
            child.nodes.insert(0, left.nodes.pop())  # type: ignore[union-attr]
        for node in (parent, left, child):
            node._p_note_change()
        _recount(left)
        _recount(child)
        return child
    if position + 1 < len(nodes) and len(nodes[position + 1].items) >= degree:
        right = nodes[position + 1]
        child.items.append(items[position])
        items[position] = right.items.pop(0)
        if child.nodes is not None:
            child.nodes.append(right.nodes.pop(0))  # type: ignore[union-attr]
        for node in (parent, right, child):
            node._p_note_change()
        _recount(right)
        _recount(child)
        return child

    # Both siblings are minimal: merge with one of them.
    if position > 0:
        return _merge_children(parent, position - 1)
    return _merge_children(parent, position)


def _collapse_root(root: BNode) -> None:
    """Replace an empty root's content with that of its only child.

    The root keeps its identity (and its count), so the tree object itself
    does not change.
    """
    child = root.nodes[0]  # type: ignore[index]
    root.items = child.items
    root.nodes = child.nodes


# ---- the tree -----------------------------------------------------------


class BTree(PersistentObject, MutableMapping[Any, Any]):
    """A persistent mapping with ordered keys.

    :param node_constructor: the :class:`BNode` subclass to build nodes with.
    """

    __slots__ = ("root",)

    #: The root node; the tree's only stored attribute.
    root: BNode

    def __init__(self, node_constructor: type[BNode] = BNode64) -> None:
        if not (
            isinstance(node_constructor, type) and issubclass(node_constructor, BNode)
        ):
            raise TypeError(
                f"BTree node_constructor must be a BNode subclass such as "
                f"BNode64, not {node_constructor!r}"
            )
        self.root = node_constructor()

    # -- size and truth

    def __len__(self) -> int:
        return _count_of(self.root)

    def __bool__(self) -> bool:
        return bool(self.root.items)

    __nonzero__ = __bool__

    # -- lookup

    def __getitem__(self, key: Any) -> Any:
        node = self.root
        while True:
            items = node.items
            position = bisect_left(items, key, key=_first)
            if position < len(items) and items[position][0] == key:
                return items[position][1]
            nodes = node.nodes
            if nodes is None:
                raise KeyError(key)
            node = nodes[position]

    def get(self, key: Any, default: Any = None) -> Any:
        """Return the value for ``key``, or ``default`` when it is absent."""
        item = _search(self.root, key)
        return default if item is None else item[1]

    def __contains__(self, key: object) -> bool:
        return _search(self.root, key) is not None

    def has_key(self, key: Any) -> bool:
        """Return True when ``key`` is in the tree (Durus spelling of ``in``)."""
        return _search(self.root, key) is not None

    def get_min_item(self) -> Item:
        """Return the ``(key, value)`` item with the smallest key.

        :raises EmptyBTreeError: when the tree is empty.
        """
        if not self.root.items:
            raise EmptyBTreeError("an empty BTree has no min item")
        return self.root.get_min_item()

    def get_max_item(self) -> Item:
        """Return the ``(key, value)`` item with the largest key.

        :raises EmptyBTreeError: when the tree is empty.
        """
        if not self.root.items:
            raise EmptyBTreeError("an empty BTree has no max item")
        return self.root.get_max_item()

    # -- iteration

    def __iter__(self) -> Iterator[Any]:
        return map(_first, _forward(*_leftmost_path(self.root)))

    def __reversed__(self) -> Iterator[Any]:
        return map(_first, _backward(*_rightmost_path(self.root)))

    def iteritems(self) -> Iterator[Item]:
        """Yield every ``(key, value)`` item in key order."""
        return _forward(*_leftmost_path(self.root))

    def iterkeys(self) -> Iterator[Any]:
        """Yield every key in order."""
        return iter(self)

    def itervalues(self) -> Iterator[Any]:
        """Yield every value in key order."""
        return map(_second, _forward(*_leftmost_path(self.root)))

    def keys(self) -> BTreeKeysView:
        """Return a live view of the keys, in order (``len`` and ``in`` work)."""
        return BTreeKeysView(self)

    def values(self) -> BTreeValuesView:
        """Return a live view of the values, in key order."""
        return BTreeValuesView(self)

    def items(self) -> BTreeItemsView:
        """Return a live view of the ``(key, value)`` items, in key order."""
        return BTreeItemsView(self)

    def items_backward(self) -> Iterator[Item]:
        """Yield every item in reverse key order."""
        return _backward(*_rightmost_path(self.root))

    def items_from(self, key: Any, closed: bool = True) -> Iterator[Item]:
        """Yield, in order, the items whose keys are >= ``key`` (> when not closed).

        :param key: where to start; it need not be in the tree.
        :param closed: include the item with exactly ``key``, if present.
        """
        bisect = bisect_left if closed else bisect_right
        return _forward(*_path_to(self.root, key, bisect))

    def items_backward_from(self, key: Any, closed: bool = False) -> Iterator[Item]:
        """Yield, in reverse order, the items whose keys are < ``key``.

        :param key: where to start; it need not be in the tree.
        :param closed: also include the item with exactly ``key`` (<=).
        """
        bisect = bisect_right if closed else bisect_left
        return _backward(*_path_to(self.root, key, bisect))

    def items_range(
        self,
        start: Any,
        end: Any,
        closed_start: bool = True,
        closed_end: bool = False,
    ) -> Iterator[Item]:
        """Yield the items with keys from ``start`` to ``end``.

        When ``start > end`` the items come in reverse order, from ``start``
        down to ``end``.

        :param closed_start: include the item with key ``start``, if present.
        :param closed_end: include the item with key ``end``, if present.
        """
        if start <= end:
            for item in self.items_from(start, closed=closed_start):
                key = item[0]
                if end < key or (key == end and not closed_end):
                    return
                yield item
        else:
            for item in self.items_backward_from(start, closed=closed_start):
                key = item[0]
                if key < end or (key == end and not closed_end):
                    return
                yield item

    # -- changes

    def add(self, key: Any, value: Any = True) -> None:
        """Make ``self[key]`` equal ``value`` (True by default, for set-like use)."""
        item = (key, value)
        root = self.root
        if _btree_add is not None and _btree_add(root, key, item, _split_child):
            return  # done in C, as below, unless the root was full
        root_class = root.__class__
        if len(root.items) >= 2 * root_class.minimum_degree - 1:
            new_root = root_class()
            new_root.nodes = [root]
            _split_child(new_root, 0, root)
            _recount(new_root)
            self.root = root = new_root
            if _btree_add is not None:
                _btree_add(root, key, item, _split_child)
                return

        # Descend, splitting full children first so that a split never has to
        # travel back up. Only a new key changes the counts on the path.
        # Every node of a tree has the root's class (see set_bnode_class).
        limit = 2 * root_class.minimum_degree - 1
        path: list[BNode] = []
        node = root
        items = root.items
        while True:
            position = bisect_left(items, key, key=_first)
            if position < len(items) and items[position][0] == key:
                items[position] = item
                _note_change(node)
                return
            nodes = node.nodes
            if nodes is None:
                items.insert(position, item)
                _note_change(node)
                _setattribute(node, "_count", len(items))
                break
            child = nodes[position]
            child_items = child.items
            if type(child) is not root_class:
                limit = 2 * type(child).minimum_degree - 1
            if len(child_items) >= limit:
                _split_child(node, position, child)
                middle = items[position][0]
                if middle == key:
                    items[position] = item
                    return
                if middle < key:
                    position += 1
                child = nodes[position]
                child_items = child.items
            path.append(node)
            node = child
            items = child_items
        for node in path:
            _note_change(node)
            try:  # noqa: SIM105 - contextlib.suppress costs more in this loop
                node._count += 1
            except AttributeError:
                pass  # a node written by Durus 4.3: it keeps no count

    __setitem__ = add

    def __delitem__(self, key: Any) -> None:
        root = self.root
        if _search(root, key) is None:
            raise KeyError(key)

        # Descend towards the key, topping up each child to at least t items
        # before entering it, so that removing from a leaf never underflows.
        _bump(root, -1)
        node = root
        while True:
            items = node.items
            position = bisect_left(items, key, key=_first)
            found = position < len(items) and items[position][0] == key
            nodes = node.nodes
            if nodes is None:
                del items[position]
                node._p_note_change()
                _setattribute(node, "_count", len(items))
                return
            if found:
                left = nodes[position]
                right = nodes[position + 1]
                degree = type(left).minimum_degree
                if len(left.items) >= degree:
                    # Put the predecessor here; delete it from the left.
                    replacement = left.get_max_item()
                    items[position] = replacement
                    node._p_note_change()
                    key = replacement[0]
                    child = left
                elif len(right.items) >= degree:
                    replacement = right.get_min_item()
                    items[position] = replacement
                    node._p_note_change()
                    key = replacement[0]
                    child = right
                else:
                    child = _merge_children(node, position)
            else:
                child = nodes[position]
                if len(child.items) < type(child).minimum_degree:
                    child = _fill_child(node, position)
            if node is root and not root.items:
                # The root's last item went into the merged child.
                _collapse_root(root)
                continue
            _bump(child, -1)
            node = child

    def clear(self) -> None:
        """Remove every item (the tree gets a fresh, empty root node)."""
        self.root = self.root.__class__()

    def setdefault(self, key: Any, value: Any = None) -> Any:
        """Return ``self[key]``, first setting it to ``value`` when absent."""
        item = _search(self.root, key)
        if item is None:
            self.add(key, value)
            return value
        return item[1]

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add items from a mapping or an iterable of pairs, then keywords."""
        if len(args) > 1:
            raise TypeError(f"update expected at most 1 argument, got {len(args)}")
        if args:
            other = args[0]
            pairs: Iterable[Any]
            if hasattr(other, "items"):
                pairs = other.items()
            elif hasattr(other, "keys"):
                pairs = ((key, other[key]) for key in other.keys())  # noqa: SIM118
            else:
                pairs = other
            for key, value in pairs:
                self.add(key, value)
        for key, value in kwargs.items():
            self.add(key, value)

    def note_change_of_bnode_containing_key(self, key: Any) -> None:
        """Mark changed the node holding ``key``.

        Call this after changing a plain (non-persistent) container stored as
        the value of ``key``, so the next commit writes it.

        :raises KeyError: when ``key`` is not in the tree.
        """
        node = self.root
        while True:
            items = node.items
            position = bisect_left(items, key, key=_first)
            if position < len(items) and items[position][0] == key:
                node._p_note_change()
                return
            nodes = node.nodes
            if nodes is None:
                raise KeyError(key)
            node = nodes[position]

    # -- shape

    def get_depth(self) -> int:
        """Return how many levels of nodes the tree has (1 for a single leaf)."""
        return self.root.get_level() + 1

    def get_node_count(self) -> int:
        """Return how many nodes the tree uses (loads every node)."""
        return self.root.get_node_count()

    def set_bnode_class(self, bnode_class: type[BNode]) -> bool:
        """Rebuild the tree with nodes of ``bnode_class`` unless it uses it already.

        :returns: True when the tree was rebuilt.
        """
        if not (isinstance(bnode_class, type) and issubclass(bnode_class, BNode)):
            raise TypeError(f"{bnode_class!r} is not a BNode subclass")
        if self.root.__class__ is bnode_class:
            return False
        rebuilt = BTree(bnode_class)
        for key, value in self.iteritems():
            rebuilt.add(key, value)
        self.root = rebuilt.root
        return True

    def set_bnode_minimum_degree(self, degree: int) -> bool:
        """Rebuild the tree with the node class of minimum degree ``degree``.

        :returns: True when the tree was rebuilt; False when it already used
            that degree or no node class has it.
        """
        for bnode_class in _node_classes():
            if bnode_class.minimum_degree == degree:
                return self.set_bnode_class(bnode_class)
        return False


def _node_classes() -> list[type[BNode]]:
    found: list[type[BNode]] = [BNode]
    for bnode_class in found:
        found.extend(
            sub
            for sub in bnode_class.__subclasses__()
            if GHOST_CLASS_MARK not in sub.__dict__  # not a ghost class
        )
    return found


class BTreeKeysView(KeysView[Any]):
    """The keys of a :class:`BTree`, in order; ``reversed()`` works too."""

    _mapping: BTree

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self._mapping)


class BTreeValuesView(ValuesView[Any]):
    """The values of a :class:`BTree`, in key order; ``reversed()`` works too."""

    _mapping: BTree

    def __iter__(self) -> Iterator[Any]:
        return self._mapping.itervalues()

    def __reversed__(self) -> Iterator[Any]:
        return map(_second, self._mapping.items_backward())


class BTreeItemsView(ItemsView[Any, Any]):
    """The items of a :class:`BTree`, in key order; ``reversed()`` works too."""

    _mapping: BTree

    def __iter__(self) -> Iterator[Item]:
        return self._mapping.iteritems()

    def __reversed__(self) -> Iterator[Item]:
        return self._mapping.items_backward()
