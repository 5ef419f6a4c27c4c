"""The HTML docs site (`make docs`), offline.

`antsibull-docs sphinx-init` writes a Sphinx project whose conf.py maps intersphinx to the Ansible docs, which
Sphinx would download. The generated plugin pages link to two labels there (the common return values, the
configuration settings); this script writes a small local intersphinx inventory holding just those labels, with
their published URLs, so the links still point at the Ansible docs and nothing is fetched:

    python scripts/docsite.py offline build/docs    after sphinx-init: the inventory and the conf.py override
    python scripts/docsite.py check build/docs      after the build: every page the site must have is there

A label the generated pages need and the inventory lacks fails the build (sphinx-build -W), so the list below only
grows when antsibull-docs starts linking to another page of the Ansible docs.
"""

import glob
import os
import sys
import zlib

ANSIBLE_DOCS = "https://docs.ansible.com/projects/ansible/devel/"
# label -> (page#anchor under ANSIBLE_DOCS, title)
ANSIBLE_LABELS = {
    "common_return_values": ("reference_appendices/common_return_values.html#common-return-values",
                             "Return Values"),
    "ansible_configuration_settings": ("reference_appendices/config.html#ansible-configuration-settings",
                                       "Ansible Configuration Settings"),
}
INVENTORY = "ansible_devel.inv"

# Pages the site must have: every module, the filter, every role, the runbooks (docs/docsite/extra-docs.yml).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected_pages():
    pages = ["index.html"]
    pages += ["%s_module.html" % os.path.basename(p)[:-3]
              for p in glob.glob(os.path.join(ROOT, "plugins", "modules", "*.py"))
              if not os.path.basename(p).startswith("_")]
    pages += ["%s_filter.html" % os.path.basename(p)[:-4]
              for p in glob.glob(os.path.join(ROOT, "plugins", "filter", "*.yml"))]
    pages += ["%s_role.html" % os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "roles", "*"))]
    pages += ["docsite/%s.html" % os.path.basename(p)[:-4]
              for p in glob.glob(os.path.join(ROOT, "docs", "docsite", "rst", "*.rst"))]
    return sorted(pages)


def offline(dest):
    lines = "".join("%s std:label -1 %s %s\n" % (label, uri, title) for label, (uri, title) in ANSIBLE_LABELS.items())
    header = ("# Sphinx inventory version 2\n# Project: Ansible\n# Version: devel\n"
              "# The remainder of this file is compressed using zlib.\n")
    with open(os.path.join(dest, INVENTORY), "wb") as f:
        f.write(header.encode("utf-8") + zlib.compress(lines.encode("utf-8")))
    with open(os.path.join(dest, "conf.py"), "a", encoding="utf-8") as f:
        f.write("\n# make docs builds offline: intersphinx reads only the local inventory scripts/docsite.py wrote.\n"
                "intersphinx_mapping = {'ansible_devel': (%r, %r)}\n"
                % (ANSIBLE_DOCS, os.path.join(os.path.abspath(dest), INVENTORY)))


def check(dest):
    html = os.path.join(dest, "build", "html")
    missing = [page for page in expected_pages() if not os.path.isfile(os.path.join(html, page))]
    if missing:
        sys.exit("docs site: pages missing under %s: %s" % (html, ", ".join(missing)))
    for page in expected_pages():
        with open(os.path.join(html, page), encoding="utf-8") as f:
            if "<h1" not in f.read():
                sys.exit("docs site: %s has no title" % page)
    print("docs site: %d pages, every module, filter, role and runbook (%s)" % (len(expected_pages()),
                                                                                 os.path.join(html, "index.html")))


def main(argv):
    if len(argv) != 3 or argv[1] not in ("offline", "check"):
        sys.exit("usage: docsite.py offline|check <sphinx-init dir>")
    (offline if argv[1] == "offline" else check)(argv[2])


if __name__ == "__main__":
    main(sys.argv)
