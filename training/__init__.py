"""The bundled training package: ``python -m training <stage> ...``.

Stages: ``simulate`` (low-dose pairs), ``candidates`` (token pools), ``langae`` (stage 1),
``seed`` (stage 2, SEED or RED-CNN with LangDA), ``evaluate``. It imports the core of
``napari_langmamba`` and never its widgets.
"""
