"""Model backends: the contracts (:mod:`.base`), the registry that picks one (:mod:`.registry`), the echo double,
what several backends share (sampling, grammars, prefixes, text, LoRA files, model resolution), and one subpackage
per engine: :mod:`.llamacpp`, :mod:`.transformers`, :mod:`.api`.

Backends see ``core`` types and ``config`` only; never a wire schema, never the gateway. Heavy libraries are
imported lazily, from the backend's own module, only when that backend is selected.
"""
