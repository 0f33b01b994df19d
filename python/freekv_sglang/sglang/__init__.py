"""The SGLang adapter: the only subpackage of freekv_sglang that imports ``sglang``.

SGLang discovers it through the ``sglang.srt.plugins`` entry point, which names
:func:`freekv_sglang.sglang.plugin.register`. Nothing here is imported by the engine-agnostic
core. The modules form layers, and a module imports only modules below it:

    plugin -> lifecycle -> flashinfer_backend -> attention_backend
        -> {prefix_cache, memory, request_checks, cpu_support} -> args -> hooks

(``frontend`` stands apart: the frontend language's backend for an ``sglang.Engine``.)
"""
