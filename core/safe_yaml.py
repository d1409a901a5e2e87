"""Load untrusted YAML (job specs, cluster profiles) into plain Python data, or fail with one clear line.

`load_yaml(data, source)` returns what `yaml.safe_load` returns for an ordinary file, but first refuses
what a hostile or broken file could do to the tools that read it: more than MAX_BYTES of input, bytes
that are not UTF-8, duplicate mapping keys, nesting deeper than MAX_DEPTH, recursive aliases, and alias
"bombs" that expand to more than MAX_NODES values. The expansion is counted on the composed node graph
with memoisation, so a billion-laughs document is refused without ever being built. Every failure is a
`YamlError` whose message names the source, the line and column where known, the problem and the fix.
Nothing here imports torch.
"""
from __future__ import annotations

from typing import Any

import yaml
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent
from yaml.nodes import CollectionNode, MappingNode, ScalarNode, SequenceNode

from core.secrets_guard import redact

MAX_BYTES = 1024 * 1024      # 1 MiB: job specs and profiles are a few KB
MAX_DEPTH = 64               # nested lists/mappings, counted after alias expansion too
MAX_NODES = 100_000          # values the document expands to, each alias counting its whole target again
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlError(ValueError):
    """Unsafe or malformed YAML; the message is one line: source, position, problem and fix."""


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def _fail(source: str, mark: Any, problem: str, fix: str) -> YamlError:
    return YamlError(" ".join(f"{source}: {_where(mark)}{problem}; {fix}".split()))


class _Loader(yaml.SafeLoader):
    """SafeLoader that limits nesting, refuses recursive aliases and duplicate keys while composing."""

    def __init__(self, stream: str, source: str):
        super().__init__(stream)
        self.source, self.open_collections = source, 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            target = self.anchors.get(event.anchor)
            if isinstance(target, CollectionNode) and target.end_mark is None:  # still being composed
                raise _fail(self.source, event.start_mark, f"alias '*{redact(event.anchor, 40)}' refers to "
                            "the list or mapping that contains it (a recursive alias)",
                            "copy the values instead of aliasing the enclosing node")
            return super().compose_node(parent, index)
        if not isinstance(event, (SequenceStartEvent, MappingStartEvent)):
            return super().compose_node(parent, index)
        if self.open_collections >= MAX_DEPTH:
            raise _fail(self.source, event.start_mark, f"lists/mappings nested more than {MAX_DEPTH} deep",
                        "flatten the structure")
        self.open_collections += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self.open_collections -= 1
        if isinstance(node, MappingNode):
            self._check_duplicates(node)
        return node

    def _check_duplicates(self, node: MappingNode) -> None:
        seen: dict[tuple[str, str], Any] = {}
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == _MERGE_TAG:
                continue
            first = seen.setdefault((key.tag, key.value), key)
            if first is not key:
                raise _fail(self.source, key.start_mark, f"duplicate key '{redact(key.value, 40)}' at lines "
                            f"{first.start_mark.line + 1} and {key.start_mark.line + 1}", "keep one")

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except YamlError:
            raise
        except (ValueError, OverflowError) as e:  # e.g. int() digit limit, impossible dates
            raise _fail(self.source, node.start_mark, f"cannot read value: {redact(str(e), 120)}",
                        "fix or quote the value") from None


def _measure(root: Any, source: str) -> None:
    """Refuse a graph that expands past MAX_NODES values or MAX_DEPTH levels (memoised, iterative)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}

    def kids(node):
        if isinstance(node, SequenceNode):
            return node.value
        if isinstance(node, MappingNode):
            return [n for pair in node.value for n in pair]
        return []

    stack = [(root, iter(kids(root)))]
    on_stack = {id(root)}
    while stack:
        node, it = stack[-1]
        for child in it:
            if id(child) in on_stack:  # unreachable from the composer's own checks; kept as a guard
                raise _fail(source, child.start_mark, "recursive alias", "copy the values instead of aliasing")
            if id(child) not in size:
                stack.append((child, iter(kids(child))))
                on_stack.add(id(child))
                break
        else:
            stack.pop()
            on_stack.discard(id(node))
            children = kids(node)
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            depth[id(node)] = (1 + max((depth[id(c)] for c in children), default=0)
                               if isinstance(node, CollectionNode) else 0)
            if size[id(node)] > MAX_NODES:
                raise _fail(source, node.start_mark, f"the document expands to more than {MAX_NODES} values "
                            "(MAX_NODES; each alias counts its whole target again)",
                            "use fewer or smaller aliases, or a smaller file")
            if depth[id(node)] > MAX_DEPTH:
                raise _fail(source, node.start_mark, f"aliases expand to lists/mappings nested more than "
                            f"{MAX_DEPTH} deep", "flatten the structure or alias less deeply")


def load_yaml(data: bytes | str, source: str) -> Any:
    """Parse one YAML document from untrusted `data` (read from `source`); see the module docstring."""
    size = len(data) if isinstance(data, bytes) or len(data) > MAX_BYTES else len(data.encode("utf-8", "replace"))
    if size > MAX_BYTES:
        raise _fail(source, None, f"{size} bytes is over the {MAX_BYTES}-byte (1 MiB) limit for a YAML file",
                    "keep specs small and point to data files by path instead of embedding them")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _fail(source, None, f"not UTF-8 at byte {e.start}", "save the file as UTF-8") from None
    loader = None
    try:
        loader = _Loader(data, source)
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node, source)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        context = redact(e.context, 200) if e.context else ""
        if context and e.context_mark is not None and e.problem_mark is not None \
                and e.context_mark.line != e.problem_mark.line:
            context += f" (line {e.context_mark.line + 1})"
        text = "; ".join(t for t in (context, redact(e.problem or "", 200)) if t) or "invalid YAML"
        fix = ("only plain YAML values are allowed: remove the '!' tag or quote the value"
               if isinstance(e, yaml.constructor.ConstructorError) else
               "fix the anchor/alias, and keep one document per file" if isinstance(e, yaml.composer.ComposerError)
               else "fix the YAML syntax there (indentation, quoting, ':' after keys)")
        raise _fail(source, e.problem_mark or e.context_mark, text, fix) from None
    except yaml.reader.ReaderError as e:
        line = data.count("\n", 0, e.position)
        mark = yaml.Mark(source, e.position, line, e.position - (data.rfind("\n", 0, e.position) + 1), None, None)
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise _fail(source, mark, f"character {redact(chr(code))} (code {code}) is not "
                    "allowed in YAML", "remove control characters from the file") from None
    except yaml.YAMLError as e:
        raise _fail(source, None, redact(str(e), 200), "fix the YAML there") from None
    finally:
        if loader is not None:
            loader.dispose()
