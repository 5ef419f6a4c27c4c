"""A small element tree of an HTML page (html.parser from the standard library), for tests that read report.html as
written or as Chromium's --dump-dom serialised it."""

from html.parser import HTMLParser

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag = tag
        self.attrs = dict(attrs)
        self.parent = parent
        self.content = []  # text and child elements, in document order

    @property
    def children(self):
        return [item for item in self.content if isinstance(item, Node)]

    def classes(self):
        return (self.attrs.get("class") or "").split()

    def find_all(self, tag, cls=None):
        """Every element below this one named `tag` (and carrying the class `cls`), in document order."""
        out = []
        for child in self.children:
            if child.tag == tag and (cls is None or cls in child.classes()):
                out.append(child)
            out.extend(child.find_all(tag, cls))
        return out

    def text(self):
        return "".join(item if isinstance(item, str) else item.text() for item in self.content)

    def title(self):
        """The text of this element's own <title> child (an SVG tooltip), or None."""
        return next((child.text() for child in self.children if child.tag == "title"), None)


class _Builder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#document", {})

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.current)
        self.current.content.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.content.append(Node(tag, attrs, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:  # a stray end tag closes nothing
            self.current = node.parent

    def handle_data(self, data):
        self.current.content.append(data)


def parse(text):
    """The document's root node."""
    builder = _Builder()
    builder.feed(text)
    builder.close()
    return builder.root
