"""The plugin's dock widgets: thin Qt views over the GUI-free core.

Each widget is a :class:`~napari_langmamba.widgets._base.WidgetBase` subclass constructed
with ``napari_viewer`` (the npe2 convention) and declared in ``napari.yaml``:
``load.LoadWidget`` (Load CT), ``compare.CompareWidget`` (Compare), and the Denoise, Tokens
and Train widgets. Tooltips of all of them live in :mod:`napari_langmamba.widgets.tooltips`.
Submodules are imported by napari on demand; this package imports nothing on its own.
"""
