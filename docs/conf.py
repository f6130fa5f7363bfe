"""Sphinx configuration for the rmsprop_jax docs.

Build:   python -m sphinx -W --keep-going -b html docs docs/_build/html
Doctest: python -m sphinx -W --keep-going -b doctest docs docs/_build/doctest

What is specific to this project:

* ``public-api``, a directive that writes one autodoc entry per name in a module's
  ``__all__``, so that a new public name appears in the reference without editing a page;
* a check, run after every read, that fails the build when a name in
  ``rmsprop_jax.__all__`` or ``rmsprop_jax.presets.__all__`` has no entry in the
  reference, however the page was written;
* signatures show annotations as the source writes them, not the unions they expand to;
* notebooks are rendered from the outputs saved in them (``nb_execution_mode = "off"``),
  read through the symlink ``docs/notebooks -> ../notebooks`` so that they keep one
  source, and the pages' ``../notebooks/NAME.ipynb`` links are pointed at them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.errors import ExtensionError
from sphinx.util.docutils import SphinxDirective
from sphinx.util.inspect import stringify_signature
from sphinx.util.typing import stringify_annotation

# -- Project ----------------------------------------------------------------------------

project = "rmsprop_jax"
author = "the rmsprop_jax authors"
copyright = "the rmsprop_jax authors"
release = importlib.metadata.version("rmsprop_jax")
version = release

# Every public name of these modules must have an entry in the reference.
PUBLIC_MODULES = ("rmsprop_jax", "rmsprop_jax.presets")

# -- General ----------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "myst_nb",  # also registers myst_parser for the .md pages
]
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
# No intersphinx: the build reads nothing from the network.
nitpicky = False  # annotations name jax/optax types that have no target without intersphinx

# -- MyST and notebooks -----------------------------------------------------------------

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links, which also work on GitHub
nb_execution_mode = "off"  # render the outputs committed in notebooks/, never run them
nb_merge_streams = True

# -- autodoc and Napoleon ---------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
# Not autodoc_preserve_defaults: it replaces each function's ``__signature__`` with one whose
# defaults are source strings, and the doctests that run later in the same process then
# see them (``optax.inject_hyperparams`` reads a factory's defaults from its signature).
python_maximum_signature_line_length = 88  # one parameter per line past this
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- Doctests ---------------------------------------------------------------------------

# Docstring examples (``>>>`` blocks) are tested by the doctest builder as well as by
# pytest --doctest-modules; the pages use ``testcode``/``testoutput`` blocks.
doctest_test_doctest_blocks = "default"

# -- HTML -------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"rmsprop_jax {release}"


# -- The reference is generated from __all__ ---------------------------------------------


def _kind(obj: Any) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "data"


_KIND_HEADINGS = {
    "function": "Functions",
    "class": "Classes",
    "module": "Modules",
    "data": "Data",
}


class PublicApi(SphinxDirective):
    """``public-api MODULE``: autodoc entries for every name in ``MODULE.__all__``.

    Options: ``:order:`` names to put first (the rest follow alphabetically within
    their kind); ``:exclude:`` names documented elsewhere on the site (the consistency
    check still requires that they are). Entries are grouped by kind (functions,
    classes, modules, data) under a rubric each.
    """

    required_arguments = 1
    option_spec = {  # noqa: RUF012 (docutils reads a class attribute)
        "order": lambda text: (text or "").split(),
        "exclude": lambda text: (text or "").split(),
    }

    def run(self) -> list:
        modname = self.arguments[0]
        module = importlib.import_module(modname)
        # Re-read this page on every build: ``__all__`` can change without the page's
        # source changing, and the consistency check must see the current list.
        self.env.note_reread()
        order = self.options.get("order", [])
        exclude = set(self.options.get("exclude", []))
        unknown = (set(order) | exclude) - set(module.__all__)
        if unknown:
            raise self.error(f"`public-api {modname}` names {sorted(unknown)}, not in __all__")
        names = [n for n in module.__all__ if n not in exclude]
        names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))
        groups: dict[str, list[str]] = {kind: [] for kind in _KIND_HEADINGS}
        for name in names:
            groups[_kind(getattr(module, name))].append(name)

        lines: list[str] = [f".. currentmodule:: {modname}", ""]
        for kind, members in groups.items():
            if not members:
                continue
            lines += [f".. rubric:: {_KIND_HEADINGS[kind]}", ""]
            for name in members:
                full = f"{modname}.{name}"
                if kind == "module":
                    lines += [f".. automodule:: {full}", "   :members:", ""]
                elif kind == "class":
                    lines += [f".. autoclass:: {name}", "   :members:", ""]
                elif kind == "function":
                    lines += [f".. autofunction:: {name}", ""]
                else:
                    value = getattr(module, name)
                    lines += [f".. py:data:: {name}", f"   :value: {value!r}", ""]
                    if name == "__version__":
                        lines += ["   The installed version of the package.", ""]
        container = nodes.container()
        content = StringList(lines, source=f"<public-api {modname}>")
        self.state.nested_parse(content, self.content_offset, container)
        return container.children


def _check_reference_complete(app: Sphinx, env: BuildEnvironment) -> None:
    """Fails the build when a public name has no entry in the reference."""
    domain = env.get_domain("py")
    documented = set(domain.objects) | set(getattr(domain, "modules", {}))
    missing = []
    for modname in PUBLIC_MODULES:
        module = importlib.import_module(modname)
        missing += [f"{modname}.{n}" for n in module.__all__ if f"{modname}.{n}" not in documented]
    if missing:
        raise ExtensionError(
            "the API reference (docs/api.rst) lacks these names from __all__: " + ", ".join(missing)
        )


def _source_annotations(
    app: Sphinx,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str, str | None] | None:
    """Signatures with annotations as the source writes them (``optax.ScalarOrSchedule``).

    autodoc evaluates the (``from __future__ import annotations``) strings and prints the
    unions they stand for, several lines of ``Array | ndarray | bool | ...`` per argument.
    """
    if signature is None or what not in ("function", "class", "method"):
        return None
    try:
        sig = inspect.signature(obj, eval_str=False)
    except (TypeError, ValueError):
        return None
    text = stringify_signature(sig, show_return_annotation=False)
    ret = sig.return_annotation
    if ret is inspect.Signature.empty or what == "class":
        return text, return_annotation
    return text, ret if isinstance(ret, str) else stringify_annotation(ret)


# -- Links to the notebooks -------------------------------------------------------------

# The pages link to notebooks the way a code host resolves them, ``../notebooks/NAME.ipynb``.
# Sphinx reads the notebooks through the ``docs/notebooks`` symlink, as documents
# ``notebooks/NAME``, while MyST resolves a link's path through the symlink to a file
# outside the source folder and cannot find the document. So before parsing, each such
# link becomes a ``{doc}`` reference to the document.
_NOTEBOOK_LINK = re.compile(r"\[([^\]]+)\]\(\.\./notebooks/([\w.-]+)\.ipynb\)")


def _link_notebooks(app: Sphinx, docname: str, source: list[str]) -> None:
    source[0] = _NOTEBOOK_LINK.sub(r"{doc}`\1 <notebooks/\2>`", source[0])


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("source-read", _link_notebooks)
    app.add_directive("public-api", PublicApi)
    app.connect("autodoc-process-signature", _source_annotations)
    app.connect("env-check-consistency", _check_reference_complete)
    return {"parallel_read_safe": True}
