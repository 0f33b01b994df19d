"""The SGLang adapter: the only subpackage of freekv_sglang that imports ``sglang``.

SGLang discovers it through the ``sglang.srt.plugins`` entry point, which names
:func:`freekv_sglang.sglang.plugin.register`. Nothing here is imported by the engine-agnostic
core, and ``sglang`` itself is imported lazily, inside the functions that need it.
"""
